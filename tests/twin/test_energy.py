"""Energy per day and district: the pure arithmetic, and the whole path from SenML meter
readings over CoAP to SummarizeEnergy and `citytwin energy`."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import aiocoap
import grpc
import pytest
from aiocoap.numbers.codes import Code
from google.protobuf.field_mask_pb2 import FieldMask

from citytwin.v1 import devices_pb2 as d
from citytwin.v1 import twins_pb2 as t
from tests.coap_devices import Site, coap_client, enrolled_device, request
from tests.conftest import Deployment, unique
from tests.twin.test_cli import citytwin, json_of
from twin.energy import DailyEnergy, Reading, energy_by_group, energy_per_device_day

UTC_ZONE = ZoneInfo("UTC")
DAY = date(2026, 3, 10)


def at(day: date, hour: int, minute: int = 0) -> datetime:
    return datetime(day.year, day.month, day.day, hour, minute, tzinfo=UTC)


def test_steps_count_on_the_day_they_end() -> None:
    readings = [
        Reading("a", at(DAY, 22), 100.0),
        Reading("a", at(DAY, 23), 150.0),
        Reading("a", at(DAY + timedelta(days=1), 1), 250.0),  # over midnight: next day
        Reading("a", at(DAY + timedelta(days=1), 2), 10.0),  # meter replaced: counts nothing
        Reading("a", at(DAY + timedelta(days=1), 3), 40.0),
        Reading("b", at(DAY, 12), 5.0),  # a single reading: no step, nothing used
    ]
    assert energy_per_device_day(readings, UTC_ZONE) == {
        ("a", DAY): 50.0,
        ("a", DAY + timedelta(days=1)): 130.0,
    }
    # In Amsterdam (UTC+1 in March) 23:00 UTC is already the next day.
    amsterdam = energy_per_device_day(readings, ZoneInfo("Europe/Amsterdam"))
    assert amsterdam == {("a", DAY + timedelta(days=1)): 180.0}


def test_groups_sum_devices_and_keep_to_the_days_asked() -> None:
    per_device = {
        ("a", DAY): 10.0,
        ("b", DAY): 5.5,
        ("c", DAY): 1.0,
        ("a", DAY + timedelta(days=1)): 7.0,
        ("a", DAY - timedelta(days=1)): 99.0,
    }
    groups = {"a": "north", "b": "north", "c": "south"}
    assert energy_by_group(per_device, groups, DAY, DAY + timedelta(days=1)) == [
        DailyEnergy("north", DAY, 15.5, 2),
        DailyEnergy("north", DAY + timedelta(days=1), 7.0, 1),
        DailyEnergy("south", DAY, 1.0, 1),
    ]


async def send_meter(
    site: Site, cert: object, key: object, readings: list[tuple[datetime, float]]
) -> None:
    pack = [
        {"n": "energy.total_wh", "u": "Wh", "t": moment.timestamp(), "v": wh}
        for moment, wh in readings
    ]
    async with coap_client(site.trust, cert, key) as coap:  # type: ignore[arg-type]
        response = await request(
            coap,
            site.coaps + "/twin/telemetry",
            aiocoap.POST,
            json.dumps(pack).encode(),
            content_format=110,
        )
    assert response.code == Code.CHANGED, response.payload


def label(site: Site, device_id: str, district: str) -> None:
    site.api.call(
        site.api.devices.UpdateDevice,
        d.UpdateDeviceRequest(
            device=d.Device(name=f"devices/{device_id}", labels={"district": district}),
            update_mask=FieldMask(paths=["labels"]),
        ),
    )


async def test_energy_per_district_from_meter_readings(site: Site, deployment: Deployment) -> None:
    north, south = unique("north"), unique("south")
    today = datetime.now(UTC).date()
    yesterday = today - timedelta(days=1)
    start = datetime.combine(yesterday, datetime.min.time(), UTC)
    plan = [
        (
            north,
            [
                (start + timedelta(hours=1), 0.0),
                (start + timedelta(hours=5), 400.0),
                (start + timedelta(hours=25), 500.0),
            ],
        ),
        (north, [(start + timedelta(hours=2), 1000.0), (start + timedelta(hours=3), 1100.0)]),
        (south, [(start + timedelta(hours=4), 50.0), (start + timedelta(hours=26), 80.0)]),
    ]
    for district, readings in plan:
        device_id, cert, key = await enrolled_device(site)
        label(site, device_id, district)
        await send_meter(site, cert, key, readings)
    selector = f"district in ({north},{south})"
    response = site.api.call(
        site.api.twins.SummarizeEnergy,
        t.SummarizeEnergyRequest(
            group_by_label="district",
            filter=selector,
            start_date=yesterday.isoformat(),
            end_date=today.isoformat(),
        ),
    )
    assert [(r.group, r.date, r.energy_wh, r.devices) for r in response.rows] == [
        (north, yesterday.isoformat(), 500.0, 2),
        (north, today.isoformat(), 100.0, 1),
        (south, today.isoformat(), 30.0, 1),
    ]
    rows = json_of(
        citytwin(
            deployment,
            *("energy", "--by", "district", "--filter", selector),
            *("--from", yesterday.isoformat(), "--to", today.isoformat(), "--json"),
            role="viewer",
        )
    )
    assert [row["energy_wh"] for row in rows] == [500.0, 100.0, 30.0]


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"start_date": "2026-01-01"}, "group_by_label"),
        ({"group_by_label": "district", "start_date": "tomorrow"}, "start_date"),
        (
            {"group_by_label": "district", "start_date": "2026-01-01", "end_date": "2025-01-01"},
            "end_date",
        ),
        (
            {"group_by_label": "district", "start_date": "2024-01-01", "end_date": "2026-01-01"},
            "366",
        ),
        (
            {"group_by_label": "district", "start_date": "2026-01-01", "time_zone": "Mars/Olympus"},
            "time_zone",
        ),
        (
            {
                "group_by_label": "district",
                "start_date": "2026-01-01",
                "filter": "reported.power=true",
            },
            "attributes",
        ),
    ],
)
def test_bad_energy_requests(site: Site, fields: dict[str, str], words: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        site.api.call(site.api.twins.SummarizeEnergy, t.SummarizeEnergyRequest(**fields))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert words in (info.value.details() or "")
