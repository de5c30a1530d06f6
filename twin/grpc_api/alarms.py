"""gRPC AlarmService: decode, call the alarm store, encode."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from citytwin.v1 import alarms_pb2, alarms_pb2_grpc
from twin import alarm_store
from twin.alarm_store import AlarmView
from twin.change_feed import ChangeType, FeedNotifier
from twin.errors import InvalidArgument
from twin.grpc_api.convert import timestamp
from twin.grpc_api.interceptor import current_principal
from twin.selectors import parse_selector

_EVENT_TYPES = {
    ChangeType.ALARM_RAISED: alarms_pb2.ALARM_EVENT_TYPE_RAISED,
    ChangeType.ALARM_ACKNOWLEDGED: alarms_pb2.ALARM_EVENT_TYPE_ACKNOWLEDGED,
    ChangeType.ALARM_CLEARED: alarms_pb2.ALARM_EVENT_TYPE_CLEARED,
}


def alarm_id_from_name(name: str) -> int:
    """The id in `alarms/{id}`."""
    prefix, _, ident = name.partition("/")
    if prefix != "alarms" or not ident.isdigit():
        raise InvalidArgument(f"name {name!r} is not of the form alarms/{{alarm_id}}")
    return int(ident)


def alarm_to_proto(view: AlarmView) -> alarms_pb2.Alarm:
    """An alarm as a message."""
    return alarms_pb2.Alarm(
        name=f"alarms/{view.id}",
        device=f"devices/{view.device_id}",
        property=view.property,
        severity=view.severity,
        active=view.active,
        first_seen_time=timestamp(view.first_seen_at),
        last_seen_time=timestamp(view.last_seen_at),
        clear_time=timestamp(view.cleared_at),
        acknowledge_time=timestamp(view.acknowledged_at),
        acknowledged_by=view.acknowledged_by,
        note=view.note,
    )


class AlarmServicer(alarms_pb2_grpc.AlarmServiceServicer):
    """Alarms over gRPC."""

    def __init__(self, notifier: FeedNotifier) -> None:
        self._notifier = notifier

    async def ListAlarms(
        self, request: alarms_pb2.ListAlarmsRequest, context: Any
    ) -> alarms_pb2.ListAlarmsResponse:
        page, token = await alarm_store.list_alarms(
            parse_selector(request.filter),
            request.filter,
            request.active_only,
            request.severity,
            request.page_size,
            request.page_token,
            current_principal(),
        )
        return alarms_pb2.ListAlarmsResponse(
            alarms=[alarm_to_proto(a) for a in page], next_page_token=token
        )

    async def GetAlarm(self, request: alarms_pb2.GetAlarmRequest, context: Any) -> alarms_pb2.Alarm:
        view = await alarm_store.get_alarm(alarm_id_from_name(request.name), current_principal())
        return alarm_to_proto(view)

    async def AcknowledgeAlarm(
        self, request: alarms_pb2.AcknowledgeAlarmRequest, context: Any
    ) -> alarms_pb2.Alarm:
        principal = current_principal()
        view = await alarm_store.acknowledge_alarm(
            alarm_id_from_name(request.name),
            request.note,
            principal,
            f"tokens/{principal.token_id}",
            self._notifier,
        )
        return alarm_to_proto(view)

    async def WatchAlarms(
        self, request: alarms_pb2.WatchAlarmsRequest, context: Any
    ) -> AsyncIterator[alarms_pb2.AlarmEvent]:
        selector = parse_selector(request.filter).combine(current_principal().scope)
        async for entry, view in alarm_store.watch_alarms(
            self._notifier, selector, request.after_cursor
        ):
            yield alarms_pb2.AlarmEvent(
                cursor=str(entry.id),
                type=_EVENT_TYPES[ChangeType(entry.change_type)],
                time=timestamp(entry.created_at),
                alarm=alarm_to_proto(view),
            )
