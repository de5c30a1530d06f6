"""Dimming schedules relative to the sun: checked when set, resolved for the lamp's location
into concrete times the lamp fetches from /twin/dimming-plan."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import grpc
import pytest
from aiocoap.numbers.codes import Code
from google.protobuf.field_mask_pb2 import FieldMask

from citytwin.v1 import devices_pb2 as d
from tests.coap_devices import Site, coap_client, enrolled_device, request, set_desired
from twin.dimming_schedule import parse_schedule, resolve_schedule

SCHEDULE = [
    {"at": "sunset", "offset_minutes": -15, "level": 100},
    {"at": "23:00", "level": 40},
    {"at": "sunrise+00:10", "level": 0},
]


async def test_a_lamp_fetches_its_plan_for_its_location(site: Site) -> None:
    device_id, cert, key = await enrolled_device(site)
    set_desired(site.api, device_id, {"dimming_schedule": SCHEDULE})
    async with coap_client(site.trust, cert, key) as coap:
        nowhere = await request(coap, site.coaps + "/twin/dimming-plan")
        assert nowhere.code == Code.CONFLICT and b"location" in nowhere.payload
        site.api.call(
            site.api.devices.UpdateDevice,
            d.UpdateDeviceRequest(
                device=d.Device(
                    name=f"devices/{device_id}",
                    location=d.Location(latitude=52.37, longitude=4.89, site_id="pole-1"),
                ),
                update_mask=FieldMask(paths=["location"]),
            ),
        )
        response = await request(coap, site.coaps + "/twin/dimming-plan")
    assert response.code == Code.CONTENT, response.payload
    plan = json.loads(response.payload)
    # The server's time zone is UTC by default.
    today = datetime.now(UTC).date()
    entries = parse_schedule(list(SCHEDULE))
    expected = [
        (moment, level)
        for day in (today, today + timedelta(days=1))
        for moment, level in resolve_schedule(entries, 52.37, 4.89, day, ZoneInfo("UTC"))
    ]
    assert [(datetime.fromisoformat(p["at"]), p["level"]) for p in plan] == expected
    assert len(plan) == 6


@pytest.mark.parametrize(
    ("schedule", "words"),
    [
        ([{"at": "sunset", "offset_minutes": 9999, "level": 100}], "offset_minutes"),
        ([{"at": "25:00", "level": 10}], "desired.dimming_schedule[0].at"),
        ([{"at": "moonrise", "level": 10}], "at"),
        ([{"at": "sunset+00:30", "offset_minutes": 5, "level": 1}], "offset"),
    ],
)
async def test_schedules_a_lamp_cannot_run_are_refused(
    site: Site, schedule: list[dict[str, object]], words: str
) -> None:
    device_id, _, _ = await enrolled_device(site)
    with pytest.raises(grpc.RpcError) as info:
        set_desired(site.api, device_id, {"dimming_schedule": schedule})
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert words in (info.value.details() or "")
