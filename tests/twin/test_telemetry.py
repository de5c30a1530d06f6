"""Telemetry over CoAP (SenML to /twin/telemetry) and its history through gRPC."""

from __future__ import annotations

import json
import time

import aiocoap
import cbor2
import grpc
import pytest
from aiocoap.numbers.codes import Code
from google.protobuf import json_format
from google.protobuf.timestamp_pb2 import Timestamp

from citytwin.v1 import devices_pb2 as d
from citytwin.v1 import twins_pb2 as t
from tests.coap_devices import Site, coap_client, enrolled_device, request

SENML_JSON, SENML_CBOR = 110, 112


def reported(site: Site, device_id: str) -> dict[str, object]:
    twin = site.api.call(site.api.twins.GetTwin, t.GetTwinRequest(name=f"devices/{device_id}"))
    result: dict[str, object] = json_format.MessageToDict(twin.reported)
    return result


def samples(site: Site, device_id: str, **fields: object) -> list[t.TelemetrySample]:
    found: list[t.TelemetrySample] = []
    token = ""
    while True:
        page = site.api.call(
            site.api.twins.ReadTelemetry,
            t.ReadTelemetryRequest(
                name=f"devices/{device_id}",
                page_size=2,
                page_token=token,
                **fields,  # type: ignore[arg-type]
            ),
        )
        found.extend(page.samples)
        token = page.next_page_token
        if not token:
            return found


async def test_senml_lands_in_reported_state_and_history(site: Site) -> None:
    device_id, cert, key = await enrolled_device(site, "env-sensor", d.SENSOR)
    base = time.time() - 120
    pack = [
        {"bt": base, "n": "noise_db", "u": "dB", "v": 55.5},
        {"n": "noise_db", "u": "dB", "v": 61.0, "t": 60},
        {"n": "pm2_5", "u": "ug/m3", "v": 12},
        {"n": "parking_occupied", "vb": True, "t": 30},
    ]
    async with coap_client(site.trust, cert, key) as coap:
        uri = site.coaps + "/twin/telemetry"
        first = await request(
            coap, uri, aiocoap.POST, json.dumps(pack).encode(), content_format=SENML_JSON
        )
        assert first.code == Code.CHANGED, first.payload
        later = [{-3: base + 90, 0: "noise_db", 1: "dB", 2: 58.25}]  # CBOR labels
        second = await request(
            coap, uri, aiocoap.POST, cbor2.dumps(later), content_format=SENML_CBOR
        )
        assert second.code == Code.CHANGED, second.payload
    assert reported(site, device_id) == {
        "noise_db": 58.25,
        "pm2_5": 12,
        "parking_occupied": True,
    }
    noise = samples(site, device_id, measurement="noise_db")
    assert [s.number_value for s in noise] == [55.5, 61.0, 58.25]  # time order
    assert all(s.unit == "dB" for s in noise)
    everything = samples(site, device_id)
    assert len(everything) == 5
    assert [s.bool_value for s in everything if s.measurement == "parking_occupied"] == [True]
    start = Timestamp()
    start.FromSeconds(int(base + 45))
    end = Timestamp()
    end.FromSeconds(int(base + 75))
    window = samples(site, device_id, measurement="noise_db", start_time=start, end_time=end)
    assert [s.number_value for s in window] == [61.0]


async def test_bad_telemetry_is_refused_and_nothing_is_stored(site: Site) -> None:
    device_id, cert, key = await enrolled_device(site, "env-sensor", d.SENSOR)
    async with coap_client(site.trust, cert, key) as coap:
        uri = site.coaps + "/twin/telemetry"
        for body, content_format, code, words in (
            (b'[{"n": "noise_db"}]', SENML_JSON, Code.BAD_REQUEST, "no value"),
            (b'{"n": "noise_db", "v": 1}', SENML_JSON, Code.BAD_REQUEST, "array"),
            (b"\xff", SENML_CBOR, Code.BAD_REQUEST, "SenML"),
            (b'[{"n": "noise_db", "v": 999}]', SENML_JSON, Code.UNPROCESSABLE_ENTITY, "noise_db"),
            (b'[{"n": "no_such", "v": 1}]', SENML_JSON, Code.UNPROCESSABLE_ENTITY, "no_such"),
            (b'[{"n": "noise_db", "v": 1}]', 50, Code.UNSUPPORTED_CONTENT_FORMAT, "110"),
        ):
            response = await request(coap, uri, aiocoap.POST, body, content_format=content_format)
            assert response.code == code, (body, response.payload)
            assert words in response.payload.decode(), response.payload
    assert reported(site, device_id) == {}
    assert samples(site, device_id) == []


def test_reading_telemetry_checks_its_arguments(site: Site) -> None:
    for request_fields, status in (
        ({"name": "devices/no-such-device"}, grpc.StatusCode.NOT_FOUND),
        ({"name": "nonsense"}, grpc.StatusCode.INVALID_ARGUMENT),
    ):
        with pytest.raises(grpc.RpcError) as info:
            site.api.call(site.api.twins.ReadTelemetry, t.ReadTelemetryRequest(**request_fields))  # type: ignore[arg-type]
        assert info.value.code() == status
