"""gRPC TwinService: decode, call the twin store or the change feed, encode."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, date
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from citytwin.v1 import twins_pb2, twins_pb2_grpc
from twin import change_feed, twin_store
from twin.change_feed import FeedNotifier
from twin.errors import InvalidArgument
from twin.grpc_api.convert import (
    change_to_proto,
    device_id_from_name,
    patch_from_struct,
    sample_to_proto,
    twin_to_proto,
)
from twin.grpc_api.interceptor import current_principal
from twin.report_commits import Report, commit_report
from twin.selectors import parse_selector
from twin.telemetry_store import read_telemetry, summarize_energy


class TwinServicer(twins_pb2_grpc.TwinServiceServicer):
    """Twins and the change feed over gRPC."""

    def __init__(self, notifier: FeedNotifier) -> None:
        self._notifier = notifier

    async def GetTwin(self, request: twins_pb2.GetTwinRequest, context: Any) -> twins_pb2.Twin:
        device_id = device_id_from_name(request.name)
        return twin_to_proto(await twin_store.get_twin(device_id, current_principal()))

    async def UpdateDesired(
        self, request: twins_pb2.UpdateDesiredRequest, context: Any
    ) -> twins_pb2.Twin:
        view = await twin_store.update_desired(
            device_id_from_name(request.name),
            patch_from_struct(request.patch),
            expected_version=request.expected_version,
            principal=current_principal(),
            notifier=self._notifier,
        )
        return twin_to_proto(view)

    async def UpdateReported(
        self, request: twins_pb2.UpdateReportedRequest, context: Any
    ) -> twins_pb2.Twin:
        report = Report(
            device_id_from_name(request.name),
            patch_from_struct(request.patch),
            current_principal(),
            expected_version=request.expected_version,
        )
        return twin_to_proto(await commit_report(report, self._notifier))

    async def BulkUpdateDesired(
        self, request: twins_pb2.BulkUpdateDesiredRequest, context: Any
    ) -> twins_pb2.BulkUpdateDesiredResponse:
        result = await twin_store.bulk_update_desired(
            parse_selector(request.filter),
            patch_from_struct(request.patch),
            current_principal(),
            self._notifier,
        )
        return twins_pb2.BulkUpdateDesiredResponse(
            matched_count=result.matched, changed_count=result.changed
        )

    async def QueryTwins(
        self, request: twins_pb2.QueryTwinsRequest, context: Any
    ) -> twins_pb2.QueryTwinsResponse:
        twins, token = await twin_store.query_twins(
            parse_selector(request.filter),
            request.filter,
            request.page_size,
            request.page_token,
            current_principal(),
        )
        return twins_pb2.QueryTwinsResponse(
            twins=[twin_to_proto(t) for t in twins], next_page_token=token
        )

    async def WatchTwins(
        self, request: twins_pb2.WatchTwinsRequest, context: Any
    ) -> AsyncIterator[twins_pb2.ChangeEvent]:
        selector = parse_selector(request.filter)
        if selector.uses_twin_values:
            raise InvalidArgument(
                "watch filters may only use device attributes and labels, not twin values"
            )
        selector = selector.combine(current_principal().scope)
        async for entry in change_feed.watch(self._notifier, selector, request.after_cursor):
            yield change_to_proto(entry)

    async def ReadTelemetry(
        self, request: twins_pb2.ReadTelemetryRequest, context: Any
    ) -> twins_pb2.ReadTelemetryResponse:
        page, token = await read_telemetry(
            device_id_from_name(request.name),
            request.measurement,
            request.start_time.ToDatetime(UTC) if request.HasField("start_time") else None,
            request.end_time.ToDatetime(UTC) if request.HasField("end_time") else None,
            request.page_size,
            request.page_token,
            current_principal(),
        )
        return twins_pb2.ReadTelemetryResponse(
            samples=[sample_to_proto(sample) for sample in page], next_page_token=token
        )

    async def SummarizeEnergy(
        self, request: twins_pb2.SummarizeEnergyRequest, context: Any
    ) -> twins_pb2.SummarizeEnergyResponse:
        first = _date(request.start_date, "start_date")
        last = _date(request.end_date, "end_date") if request.end_date else first
        try:
            tz = ZoneInfo(request.time_zone or "UTC")
        except (ZoneInfoNotFoundError, ValueError):
            raise InvalidArgument(f"time_zone {request.time_zone!r} is not an IANA zone") from None
        rows = await summarize_energy(
            parse_selector(request.filter),
            request.group_by_label,
            first,
            last,
            tz,
            current_principal(),
        )
        return twins_pb2.SummarizeEnergyResponse(
            rows=[
                twins_pb2.EnergyRow(
                    group=r.group,
                    date=r.day.isoformat(),
                    energy_wh=r.energy_wh,
                    devices=r.devices,
                )
                for r in rows
            ]
        )


def _date(text: str, field: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise InvalidArgument(f"{field} must be YYYY-MM-DD, not {text!r}") from None
