"""The device-facing twin API over coaps+tcp, with real aiocoap clients holding certificates
issued by enrollment: reports, observed desired state and delta, ETags, and refusals."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiocoap
import cbor2
import grpc
import pytest
from aiocoap.numbers.codes import Code
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from google.protobuf import json_format

from citytwin.v1 import devices_pb2 as d
from citytwin.v1 import profiles_pb2 as pr
from citytwin.v1 import provisioning_pb2 as p
from citytwin.v1 import twins_pb2 as t
from tests.coap_devices import (
    Site,
    coap_client,
    enrolled_device,
    fleet_trust,
    request,
    set_desired,
    twin_of,
)
from tests.conftest import PG_DSN, Api, Server, new_database, run_cli

JSON, CBOR = 50, 60


async def report(
    context: aiocoap.Context,
    site: Site,
    body: bytes,
    content_format: int = JSON,
    method: aiocoap.numbers.codes.Code = aiocoap.POST,
) -> aiocoap.Message:
    return await request(
        context, site.coaps + "/twin/reported", method, body, content_format=content_format
    )


@dataclass
class Device:
    """An enrolled device: its id, certificate and key."""

    id: str
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


async def enrolled(site: Site, model: str = "lamp-led-dimmable") -> Device:
    return Device(*await enrolled_device(site, model))


async def test_reports_in_json_and_cbor_are_committed_before_the_answer(site: Site) -> None:
    device = await enrolled(site)
    async with coap_client(site.trust, device.cert, device.key) as coap:
        first = await report(coap, site, json.dumps({"power": True, "brightness": 40}).encode())
        assert first.code == Code.CHANGED, first.payload
        version = int.from_bytes(first.opt.etag, "big")
        assert twin_of(site, device.id).version == version
        second = await report(coap, site, cbor2.dumps({"brightness": 55}), CBOR, aiocoap.PATCH)
        assert second.code == Code.CHANGED, second.payload
    twin = twin_of(site, device.id)
    assert json_format.MessageToDict(twin.reported) == {"power": True, "brightness": 55}
    assert twin.version == version + 1
    assert site.device(device.id).state == d.ACTIVE


async def test_bad_reports_are_refused_and_nothing_is_stored(site: Site) -> None:
    device = await enrolled(site)
    async with coap_client(site.trust, device.cert, device.key) as coap:
        assert (await report(coap, site, b'{"power": true}')).code == Code.CHANGED
        before = twin_of(site, device.id)
        cases = [
            (b'{"power": ', JSON, Code.BAD_REQUEST, "not valid JSON"),
            (b"\xff\x00", CBOR, Code.BAD_REQUEST, "not valid CBOR"),
            (b"[1, 2]", JSON, Code.BAD_REQUEST, "object"),
            (b'{"brightness": 500}', JSON, Code.UNPROCESSABLE_ENTITY, "brightness"),
            (b'{"no_such_thing": 1}', JSON, Code.UNPROCESSABLE_ENTITY, "no_such_thing"),
            (b'{"power": true}', 0, Code.UNSUPPORTED_CONTENT_FORMAT, "50"),
            (b'{"x": "' + b"a" * 70_000 + b'"}', JSON, Code.REQUEST_ENTITY_TOO_LARGE, "65536"),
        ]
        for body, content_format, code, words in cases:
            response = await report(coap, site, body, content_format)
            assert response.code == code, (body[:20], response.payload)
            assert words in response.payload.decode(), response.payload
    assert twin_of(site, device.id) == before


async def test_a_device_needs_a_valid_certificate_of_its_own(site: Site) -> None:
    device = await enrolled(site)
    other = await enrolled(site)
    async with coap_client(site.trust) as anonymous:
        response = await report(anonymous, site, b'{"power": true}')
        assert response.code == Code.UNAUTHORIZED
        assert (await request(anonymous, site.coaps + "/twin")).code == Code.UNAUTHORIZED
    async with coap_client(site.trust, device.cert, device.key) as coap:
        whole = await request(coap, site.coaps + "/twin")
        assert json.loads(whole.payload)["device"] == device.id
        assert (await report(coap, site, b'{"power": true}')).code == Code.CHANGED
    # Only the device's own twin changed.
    assert json_format.MessageToDict(twin_of(site, other.id).reported) == {}
    site.api.call(
        site.api.provisioning.RevokeCertificate,
        p.RevokeCertificateRequest(
            name=f"certificates/{device.cert.serial_number:x}", reason="test"
        ),
    )
    async with coap_client(site.trust, device.cert, device.key) as coap:
        refused = await report(coap, site, b'{"power": false}')
    assert refused.code == Code.FORBIDDEN
    assert b"revoked" in refused.payload


async def test_etags_let_a_waking_device_ask_cheaply(site: Site) -> None:
    device = await enrolled(site)
    set_desired(site.api, device.id, {"brightness": 30})
    async with coap_client(site.trust, device.cert, device.key) as coap:
        first = await request(coap, site.coaps + "/twin/desired")
        assert first.code == Code.CONTENT
        assert json.loads(first.payload) == {"brightness": 30}
        same = await request(coap, site.coaps + "/twin/desired", etags=[first.opt.etag])
        assert same.code == Code.VALID and same.payload == b""
        in_cbor = await request(coap, site.coaps + "/twin/desired", accept=CBOR)
        assert cbor2.loads(in_cbor.payload) == {"brightness": 30}
        assert in_cbor.opt.etag == first.opt.etag
        set_desired(site.api, device.id, {"brightness": 31})
        changed = await request(coap, site.coaps + "/twin/desired", etags=[first.opt.etag])
        assert changed.code == Code.CONTENT and changed.opt.etag != first.opt.etag


async def next_notification(notifications: AsyncIterator[aiocoap.Message]) -> aiocoap.Message:
    """The next notification from a client observation's iterator, within 10 s. (One iterator
    per observation: aiocoap starts every new one at the latest notification.)"""
    return await asyncio.wait_for(anext(notifications), 10)


async def test_desired_changes_reach_observers_at_once(site: Site) -> None:
    device = await enrolled(site)
    other = await enrolled(site)
    async with coap_client(site.trust, device.cert, device.key) as coap:
        message = aiocoap.Message(code=aiocoap.GET, uri=site.coaps + "/twin/desired", observe=0)
        pending = coap.request(message)
        first = await asyncio.wait_for(pending.response, 10)
        assert first.code == Code.CONTENT and json.loads(first.payload) == {}
        desired_updates = aiter(pending.observation)
        delta_request = coap.request(
            aiocoap.Message(code=aiocoap.GET, uri=site.coaps + "/twin/delta", observe=0)
        )
        assert json.loads((await asyncio.wait_for(delta_request.response, 10)).payload) == {}
        delta_updates = aiter(delta_request.observation)
        # Another device's change is not pushed here.
        set_desired(site.api, other.id, {"brightness": 10})
        set_desired(site.api, device.id, {"brightness": 70, "power": True})
        notified = await next_notification(desired_updates)
        assert json.loads(notified.payload) == {"brightness": 70, "power": True}
        delta = await next_notification(delta_updates)
        assert json.loads(delta.payload) == {"brightness": 70, "power": True}
        # Reporting part of it shrinks the delta, and the delta observer hears of it.
        assert (await report(coap, site, b'{"brightness": 70}')).code == Code.CHANGED
        shrunk = await next_notification(delta_updates)
        assert json.loads(shrunk.payload) == {"power": True}
        pending.observation.cancel()
        delta_request.observation.cancel()


async def test_decommissioning_ends_the_observation(site: Site) -> None:
    device = await enrolled(site)
    async with coap_client(site.trust, device.cert, device.key) as coap:
        pending = coap.request(
            aiocoap.Message(code=aiocoap.GET, uri=site.coaps + "/twin/desired", observe=0)
        )
        await asyncio.wait_for(pending.response, 10)
        desired_updates = aiter(pending.observation)
        site.api.call(
            site.api.devices.DecommissionDevice,
            d.DecommissionDeviceRequest(name=f"devices/{device.id}"),
        )
        try:
            notified = await next_notification(desired_updates)
        except aiocoap.error.Error:
            pass  # aiocoap ends an observation on an error notification
        else:
            assert notified.code == Code.FORBIDDEN


@pytest.mark.skipif(not PG_DSN, reason="replicas share a database only on PostgreSQL")
async def test_observer_on_another_replica_hears_of_a_grpc_change(tmp_path: Path) -> None:
    db = await asyncio.to_thread(new_database, "postgres", tmp_path / "home")
    token = run_cli(db, "token", "create", "--role", "admin").stdout.strip()
    first, second = Server(db).start(), Server(db).start()
    try:
        with grpc.insecure_channel(first.address) as channel:
            site_a = Site(first, Api(channel, token), fleet_trust(db))
            site_b = Site(second, site_a.api, site_a.trust)
            device = await enrolled(site_a)
            async with coap_client(site_b.trust, device.cert, device.key) as coap:
                pending = coap.request(
                    aiocoap.Message(code=aiocoap.GET, uri=site_b.coaps + "/twin/desired", observe=0)
                )
                await asyncio.wait_for(pending.response, 10)
                desired_updates = aiter(pending.observation)
                set_desired(site_a.api, device.id, {"brightness": 12})
                notified = await next_notification(desired_updates)
                assert json.loads(notified.payload) == {"brightness": 12}
                pending.observation.cancel()
    finally:
        first.stop()
        second.stop()
        await asyncio.to_thread(db.drop)


def feed_types(api: Api, device_id: str) -> list[str]:
    """The change types of a device's feed entries so far."""
    stream = api.call(
        api.twins.WatchTwins,
        t.WatchTwinsRequest(filter=f"id={device_id}", after_cursor="0"),
        timeout=2,
    )
    types: list[str] = []
    try:
        for event in stream:
            types.append(t.ChangeType.Name(event.type))
    except grpc.RpcError as ended:
        assert ended.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    return types


@pytest.mark.server_env({"CITYTWIN_OFFLINE_TOLERANCE": "1", "CITYTWIN_LIVENESS_SWEEP": "0.5"})
async def test_silent_devices_go_offline_and_come_back(own_site: Site) -> None:
    site = own_site
    model = "chatty-lamp"
    site.api.call(
        site.api.profiles.CreateProfile,
        pr.CreateProfileRequest(
            profile=pr.DeviceProfile(
                model=model,
                kind=d.LAMP,
                heartbeat_interval_seconds=10,
                properties=[pr.PropertySpec(path="power", type=pr.BOOLEAN, writable=True)],
            )
        ),
    )
    device = await enrolled(site, model)
    assert not site.device(device.id).online
    async with coap_client(site.trust, device.cert, device.key) as coap:
        beat = await request(coap, site.coaps + "/twin/heartbeat", aiocoap.POST)
        assert beat.code == Code.CHANGED
        seen = site.device(device.id)
        assert seen.online and seen.HasField("last_seen_time")
        # It observes its desired state and then says nothing, while changes are pushed to
        # it: notifications the server sends are no sign of life. After 10 s x 1: offline.
        observing = coap.request(
            aiocoap.Message(code=aiocoap.GET, uri=site.coaps + "/twin/desired", observe=0)
        )
        await asyncio.wait_for(observing.response, 10)
        for step in range(30):
            set_desired(site.api, device.id, {"power": step % 2 == 0})
            await asyncio.sleep(0.5)
            if not site.device(device.id).online:
                break
        assert not site.device(device.id).online
        observing.observation.cancel()
        # Any request brings it back.
        assert (await report(coap, site, b'{"power": true}')).code == Code.CHANGED
        assert site.device(device.id).online
    types = await asyncio.to_thread(feed_types, site.api, device.id)
    assert [x for x in types if x.startswith("DEVICE_O")][:3] == [
        "DEVICE_ONLINE",
        "DEVICE_OFFLINE",
        "DEVICE_ONLINE",
    ]
