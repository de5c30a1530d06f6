"""Device reports committed in groups (twin/report_commits.py): what many devices reporting at
once through a real server end up with, and telemetry arriving out of order."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime

import aiocoap
import cbor2
from aiocoap.numbers.codes import Code
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from google.protobuf import json_format

from citytwin.v1 import devices_pb2 as d
from tests.coap_devices import Site, coap_client, enrolled_device, request, twin_of

CBOR, SENML_JSON = 60, 110


async def test_many_devices_reporting_at_once_each_get_their_own_outcome(site: Site) -> None:
    """Reports of many devices, several in flight per device and some refused, committed
    together: each device ends with what its own valid reports said, one twin version per
    valid report, and nothing of the refused ones. (Reports a device sends without waiting
    for the answers may be applied in any order, as CoAP promises none; these touch
    different properties.)"""
    devices = [await enrolled_device(site) for _ in range(8)]
    uri = site.coaps + "/twin/reported"
    bodies: list[tuple[dict[str, object], Code]] = [
        ({"brightness": 10}, Code.CHANGED),
        ({"brightness": 500}, Code.UNPROCESSABLE_ENTITY),  # outside the profile's 0-100
        ({"power": True}, Code.CHANGED),
        ({"no_such_property": 1}, Code.UNPROCESSABLE_ENTITY),
        ({"fault_codes": ["E1"]}, Code.CHANGED),
    ]

    async def device(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> list[Code]:
        async with coap_client(site.trust, cert, key) as coap:
            responses = await asyncio.gather(
                *(
                    request(coap, uri, aiocoap.POST, cbor2.dumps(body), content_format=CBOR)
                    for body, _ in bodies
                )
            )
        return [r.code for r in responses]

    before = {device_id: twin_of(site, device_id).version for device_id, _, _ in devices}
    answers = await asyncio.gather(*(device(cert, key) for _, cert, key in devices))
    for (device_id, _, _), codes in zip(devices, answers, strict=True):
        assert codes == [code for _, code in bodies]
        twin = twin_of(site, device_id)
        assert json_format.MessageToDict(twin.reported) == {
            "brightness": 10,
            "power": True,
            "fault_codes": ["E1"],
        }
        assert twin.version == before[device_id] + 3


async def test_an_older_telemetry_pack_does_not_overwrite_newer_values(site: Site) -> None:
    """A pack held back in a sensor's queue arrives after a newer one: its samples join the
    history, but the reported state keeps the newer values; a measurement the late pack has
    newer news of is still taken."""
    device_id, cert, key = await enrolled_device(site, "env-sensor", d.SENSOR)
    now = time.time()
    newer = [{"bt": now - 60, "n": "noise_db", "u": "dB", "v": 50.0}]
    older = [
        {"bt": now - 600, "n": "noise_db", "u": "dB", "v": 70.0},
        {"n": "pm2_5", "u": "ug/m3", "v": 9, "t": 590},  # 10 s ago: newer than anything stored
    ]
    async with coap_client(site.trust, cert, key) as coap:
        uri = site.coaps + "/twin/telemetry"
        for pack in (newer, older):
            answer = await request(
                coap, uri, aiocoap.POST, json.dumps(pack).encode(), content_format=SENML_JSON
            )
            assert answer.code == Code.CHANGED, answer.payload
    twin = twin_of(site, device_id)
    assert json_format.MessageToDict(twin.reported) == {"noise_db": 50.0, "pm2_5": 9}
    # The values' times are when they were measured, not when they arrived.
    stamps = json_format.MessageToDict(twin.reported_metadata)
    assert datetime.fromisoformat(stamps["noise_db"]) == datetime.fromtimestamp(
        int((now - 60) * 1000) / 1000, UTC
    )
    # A plain report always wins: it is the device's state as of now.
    async with coap_client(site.trust, cert, key) as coap:
        answer = await request(
            coap,
            site.coaps + "/twin/reported",
            aiocoap.POST,
            cbor2.dumps({"noise_db": 40.0}),
            content_format=CBOR,
        )
        assert answer.code == Code.CHANGED
    assert json_format.MessageToDict(twin_of(site, device_id).reported)["noise_db"] == 40.0
