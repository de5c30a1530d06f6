"""Reconciliation through the real service: sync status on twins (pending, stale, rejected,
in sync), acknowledgements, re-notification with backoff, selectors and the change feed."""

from __future__ import annotations

import asyncio
import json

import aiocoap
import grpc
from aiocoap.numbers.codes import Code
from google.protobuf import json_format
from google.protobuf.field_mask_pb2 import FieldMask

from citytwin.v1 import devices_pb2 as d
from citytwin.v1 import twins_pb2 as t
from tests.coap_devices import Site, coap_client, enrolled_device, request, set_desired, twin_of
from tests.conftest import Api, unique


def query(site: Site, selector: str) -> list[str]:
    response = site.api.call(site.api.twins.QueryTwins, t.QueryTwinsRequest(filter=selector))
    return sorted(x.name.split("/")[1] for x in response.twins)


def sync_events(api: Api, device_id: str) -> list[int]:
    stream = api.call(
        api.twins.WatchTwins,
        t.WatchTwinsRequest(filter=f"id={device_id}", after_cursor="0"),
        timeout=2,
    )
    states: list[int] = []
    try:
        for event in stream:
            if event.type == t.SYNC_STATUS_CHANGED:
                states.append(event.sync_status.state)
    except grpc.RpcError as ended:
        assert ended.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    return states


async def report(coap: aiocoap.Context, site: Site, body: dict[str, object]) -> None:
    response = await request(
        coap,
        site.coaps + "/twin/reported",
        aiocoap.POST,
        json.dumps(body).encode(),
        content_format=50,
    )
    assert response.code == Code.CHANGED, response.payload


async def test_pending_then_in_sync_when_the_device_reports_the_desired_values(
    site: Site,
) -> None:
    district = unique("d")
    device_id, cert, key = await enrolled_device(site)
    site.api.call(
        site.api.devices.UpdateDevice,
        d.UpdateDeviceRequest(
            device=d.Device(name=f"devices/{device_id}", labels={"district": district}),
            update_mask=FieldMask(paths=["labels"]),
        ),
    )
    assert twin_of(site, device_id).sync_status.state == t.SYNC_STATE_IN_SYNC
    async with coap_client(site.trust, cert, key) as coap:
        beat = await request(coap, site.coaps + "/twin/heartbeat", aiocoap.POST)
        assert beat.code == Code.CHANGED
        twin = set_desired(site.api, device_id, {"brightness": 60, "power": True})
        status = twin.sync_status
        assert status.state == t.SYNC_STATE_PENDING
        assert status.desired_version == twin.version and status.push_attempts == 1
        assert query(site, f"district={district},sync!=in-sync") == [device_id]
        await report(coap, site, {"brightness": 60})
        assert twin_of(site, device_id).sync_status.state == t.SYNC_STATE_PENDING
        await report(coap, site, {"power": True})
    done = twin_of(site, device_id).sync_status
    assert done.state == t.SYNC_STATE_IN_SYNC and done.HasField("converged_time")
    assert query(site, f"district={district},sync!=in-sync") == []
    assert query(site, f"district={district},sync=in-sync") == [device_id]
    states = await asyncio.to_thread(sync_events, site.api, device_id)
    assert states == [t.SYNC_STATE_PENDING, t.SYNC_STATE_IN_SYNC]


async def test_an_offline_device_is_stale_and_a_rejection_is_recorded(site: Site) -> None:
    device_id, cert, key = await enrolled_device(site)
    first = set_desired(site.api, device_id, {"brightness": 20})
    # Never heard from: offline, so the delta waits.
    assert first.sync_status.state == t.SYNC_STATE_STALE
    latest = set_desired(site.api, device_id, {"brightness": 100, "power": True})
    async with coap_client(site.trust, cert, key) as coap:
        # Waking up, it gets one delta with only the latest values.
        delta = await request(coap, site.coaps + "/twin/delta")
        assert json.loads(delta.payload) == {"brightness": 100, "power": True}
        assert twin_of(site, device_id).sync_status.state == t.SYNC_STATE_PENDING
        # The desired state's ETag is the version an acknowledgement names.
        desired = await request(coap, site.coaps + "/twin/desired")
        version = int.from_bytes(desired.opt.etag, "big")
        assert version == latest.version == latest.sync_status.desired_version
        await report(
            coap,
            site,
            {
                "power": True,
                "$ack": {
                    "version": version,
                    "status": "rejected",
                    "reason": "driver limited to 80 %",
                    "properties": {"brightness": {"status": "rejected", "reason": "max 80"}},
                },
            },
        )
        rejected = twin_of(site, device_id)
        assert rejected.sync_status.state == t.SYNC_STATE_REJECTED
        assert rejected.sync_status.rejected_reason == "driver limited to 80 %"
        assert dict(rejected.sync_status.rejected_properties) == {"brightness": "max 80"}
        assert rejected.acknowledgement.status == "rejected"
        assert json_format.MessageToDict(rejected.reported) == {"power": True}
        assert device_id in query(site, "sync=rejected")
        # A new desired version is worth another try.
        again = set_desired(site.api, device_id, {"brightness": 80})
        assert again.sync_status.state == t.SYNC_STATE_PENDING
        bad = await request(
            coap,
            site.coaps + "/twin/reported",
            aiocoap.POST,
            json.dumps({"$ack": {"version": 1, "status": "maybe"}}).encode(),
            content_format=50,
        )
        assert bad.code == Code.BAD_REQUEST and b"$ack.status" in bad.payload


async def test_a_pending_device_is_notified_again_with_backoff(site: Site) -> None:
    device_id, cert, key = await enrolled_device(site)
    async with coap_client(site.trust, cert, key) as coap:
        pending = coap.request(
            aiocoap.Message(code=aiocoap.GET, uri=site.coaps + "/twin/delta", observe=0)
        )
        await asyncio.wait_for(pending.response, 10)
        updates = aiter(pending.observation)
        set_desired(site.api, device_id, {"brightness": 33})
        first = await asyncio.wait_for(anext(updates), 10)
        assert json.loads(first.payload) == {"brightness": 33}
        # The device does nothing; 5 s later the reconciler notifies it again.
        again = await asyncio.wait_for(anext(updates), 10)
        assert json.loads(again.payload) == {"brightness": 33}
        pending.observation.cancel()
    status = twin_of(site, device_id).sync_status
    assert status.state == t.SYNC_STATE_PENDING and status.push_attempts >= 2
