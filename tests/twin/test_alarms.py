"""Alarms: raised by fault properties a device reports, acknowledged by operators, cleared by
the device; listed, fetched and watched over gRPC. Plus the pure rules."""

from __future__ import annotations

import json

import aiocoap
import grpc
import pytest
from aiocoap.numbers.codes import Code
from google.protobuf import json_format
from google.protobuf.struct_pb2 import Struct

from citytwin.v1 import alarms_pb2 as a
from citytwin.v1 import devices_pb2 as d
from citytwin.v1 import twins_pb2 as t
from tests.coap_devices import Site, coap_client, enrolled_device, request
from tests.conftest import Api, Deployment, unique
from tests.twin.test_cli import citytwin, json_of, ok
from twin.alarm_rules import FaultChanges, fault_changes
from twin.builtin_profiles import builtin_profile

LAMP = builtin_profile("lamp-led-dimmable")


@pytest.mark.parametrize(
    ("reported", "report", "active", "expected"),
    [
        ({}, {}, set(), FaultChanges()),
        (
            {"faults": {"lamp_failure": True}},
            {"faults": {"lamp_failure": True}},
            set(),
            FaultChanges(raised=("faults.lamp_failure",)),
        ),
        (
            {"faults": {"lamp_failure": True}},
            {"faults": {"lamp_failure": True}},
            {"faults.lamp_failure"},
            FaultChanges(seen_again=("faults.lamp_failure",)),
        ),
        # A report about something else leaves the active alarm as it is.
        (
            {"faults": {"lamp_failure": True}, "power": True},
            {"power": True},
            {"faults.lamp_failure"},
            FaultChanges(),
        ),
        (
            {"faults": {"lamp_failure": False}},
            {"faults": {"lamp_failure": False}},
            {"faults.lamp_failure"},
            FaultChanges(cleared=("faults.lamp_failure",)),
        ),
        (
            {},
            {"faults": None},
            {"faults.driver_failure"},
            FaultChanges(cleared=("faults.driver_failure",)),
        ),
        # Only declared fault flags count; truthy non-booleans are not true.
        ({"power": True, "faults": {"lamp_failure": 1}}, {}, set(), FaultChanges()),
    ],
)
def test_fault_rules(
    reported: dict[str, object], report: dict[str, object], active: set[str], expected: FaultChanges
) -> None:
    assert LAMP is not None
    assert fault_changes(LAMP, reported, report, active) == expected


def alarms(api: Api, device_id: str, **fields: object) -> list[a.Alarm]:
    response = api.call(
        api.alarms.ListAlarms,
        a.ListAlarmsRequest(filter=f"id={device_id}", **fields),  # type: ignore[arg-type]
    )
    return list(response.alarms)


def alarm_events(api: Api, device_id: str) -> list[tuple[int, bool]]:
    stream = api.call(
        api.alarms.WatchAlarms,
        a.WatchAlarmsRequest(filter=f"id={device_id}", after_cursor="0"),
        timeout=2,
    )
    seen: list[tuple[int, bool]] = []
    try:
        for event in stream:
            seen.append((event.type, event.alarm.active))
    except grpc.RpcError as ended:
        assert ended.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    return seen


async def test_an_alarm_is_raised_acknowledged_and_cleared(site: Site) -> None:
    device_id, cert, key = await enrolled_device(site)
    api = site.api
    async with coap_client(site.trust, cert, key) as coap:

        async def report(body: dict[str, object]) -> None:
            response = await request(
                coap,
                site.coaps + "/twin/reported",
                aiocoap.POST,
                json.dumps(body).encode(),
                content_format=50,
            )
            assert response.code == Code.CHANGED, response.payload

        await report({"faults": {"lamp_failure": True}, "power": True})
        (raised,) = alarms(api, device_id, active_only=True)
        assert (raised.property, raised.severity, raised.active) == (
            "faults.lamp_failure",
            "major",
            True,
        )
        assert raised.first_seen_time == raised.last_seen_time
        await report({"faults": {"lamp_failure": True}})
        (again,) = alarms(api, device_id)
        assert again.name == raised.name
        assert again.last_seen_time.ToDatetime() > raised.last_seen_time.ToDatetime()
        acked = api.call(
            api.alarms.AcknowledgeAlarm,
            a.AcknowledgeAlarmRequest(name=raised.name, note="crew sent, ticket 4711"),
        )
        assert acked.active and acked.note == "crew sent, ticket 4711"
        assert acked.acknowledged_by.startswith("tokens/") and acked.HasField("acknowledge_time")
        await report({"faults": {"lamp_failure": False}})
    (cleared,) = alarms(api, device_id)
    assert not cleared.active and cleared.HasField("clear_time")
    assert alarms(api, device_id, active_only=True) == []
    assert alarm_events(api, device_id) == [
        (a.ALARM_EVENT_TYPE_RAISED, True),
        (a.ALARM_EVENT_TYPE_ACKNOWLEDGED, True),
        (a.ALARM_EVENT_TYPE_CLEARED, False),
    ]
    fetched = api.call(api.alarms.GetAlarm, a.GetAlarmRequest(name=raised.name))
    assert fetched == cleared


async def test_alarm_requests_are_checked(site: Site, deployment: Deployment) -> None:
    device_id, _, _ = await enrolled_device(site)
    api = site.api
    api.call(
        api.twins.UpdateReported,
        t.UpdateReportedRequest(
            name=f"devices/{device_id}",
            patch=json_format.ParseDict({"faults": {"driver_failure": True}}, Struct()),
        ),
    )
    (alarm,) = alarms(api, device_id)
    viewer = deployment.api("viewer")
    with pytest.raises(grpc.RpcError) as denied:
        viewer.call(viewer.alarms.AcknowledgeAlarm, a.AcknowledgeAlarmRequest(name=alarm.name))
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert alarms(viewer, device_id) == [alarm]
    for request_message, call, status in (
        (a.GetAlarmRequest(name="alarms/999999"), api.alarms.GetAlarm, grpc.StatusCode.NOT_FOUND),
        (a.GetAlarmRequest(name="alarm/1"), api.alarms.GetAlarm, grpc.StatusCode.INVALID_ARGUMENT),
        (
            a.AcknowledgeAlarmRequest(name=alarm.name, note="x" * 513),
            api.alarms.AcknowledgeAlarm,
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            a.ListAlarmsRequest(severity="apocalyptic"),
            api.alarms.ListAlarms,
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            a.ListAlarmsRequest(filter="reported.power=true"),
            api.alarms.ListAlarms,
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
    ):
        with pytest.raises(grpc.RpcError) as info:
            api.call(call, request_message)
        assert info.value.code() == status, request_message


def test_the_alarms_command(deployment: Deployment) -> None:
    api = deployment.api("admin")
    device_id = unique("lamp")
    api.call(
        api.devices.CreateDevice,
        d.CreateDeviceRequest(
            device_id=device_id,
            device=d.Device(kind=d.LAMP, model="lamp-led-dimmable", serial_number=unique("SN")),
        ),
    )
    api.call(
        api.twins.UpdateReported,
        t.UpdateReportedRequest(
            name=f"devices/{device_id}",
            patch=json_format.ParseDict({"faults": {"lamp_failure": True}}, Struct()),
        ),
    )
    listed = json_of(
        citytwin(deployment, "alarms", "list", "--filter", f"id={device_id}", "--json")
    )
    assert [(x["property"], x["severity"], x["active"]) for x in listed] == [
        ("faults.lamp_failure", "major", True)
    ]
    alarm_id = listed[0]["name"].removeprefix("alarms/")
    table = ok(citytwin(deployment, "alarms", "list", "--filter", f"id={device_id}"))
    assert "faults.lamp_failure" in table and "major" in table
    acked = ok(
        citytwin(deployment, "alarms", "ack", alarm_id, "--note", "crew sent", role="service")
    )
    assert "crew sent" in acked
    denied = citytwin(deployment, "alarms", "ack", alarm_id, role="viewer")
    assert denied.returncode == 2 and "PERMISSION_DENIED" in denied.stderr
    watched = ok(
        citytwin(
            deployment,
            *("alarms", "watch", "--filter", f"id={device_id}", "--after", "0", "--limit", "2"),
        )
    ).splitlines()
    assert [line.split()[2] for line in watched] == ["raised", "acknowledged"]
