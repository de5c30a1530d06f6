"""Firmware rollouts through the real service: signed uploads over gRPC, campaigns driven by
the server, devices downloading block-wise over coaps+tcp and reporting progress."""

from __future__ import annotations

import asyncio
import hashlib
import time
from pathlib import Path

import grpc
import pytest
from aiocoap.numbers.codes import Code
from google.protobuf import json_format

from citytwin.v1 import firmware_pb2 as f
from tests.coap_devices import Site, coap_client, request, set_desired, twin_of
from tests.conftest import unique
from tests.firmware_ota.ota_devices import (
    Misbehaviour,
    Release,
    label,
    ota_devices,
    running,
    upload,
)


def campaign(api, artifact: f.Artifact, target: str, **fields) -> f.Campaign:
    created = api.call(
        api.campaigns.CreateCampaign,
        f.CreateCampaignRequest(
            campaign=f.Campaign(artifact=artifact.name, target_filter=target, **fields)
        ),
    )
    return api.call(api.campaigns.StartCampaign, f.CampaignActionRequest(name=created.name))


async def until(api, name: str, done, limit: float = 60.0) -> f.Campaign:
    deadline = time.monotonic() + limit
    while True:
        current = api.call(api.campaigns.GetCampaign, f.GetCampaignRequest(name=name))
        if done(current):
            return current
        assert time.monotonic() < deadline, (
            f"state {current.state}: {current.state_reason}; counts {current.counts}; "
            f"wave {current.current_wave} {[w.status for w in current.wave_status]}"
        )
        await asyncio.sleep(0.1)


def executions(api, name: str) -> list[f.Execution]:
    return list(
        api.call(
            api.campaigns.ListExecutions, f.ListExecutionsRequest(parent=name, page_size=1000)
        ).executions
    )


async def test_campaign_updates_every_targeted_device(site: Site, tmp_path: Path) -> None:
    release = Release(site.api, tmp_path)
    image = release.mcuboot("2.1.0+7")
    artifact = upload(site.api, image, compatible_kinds=["lamp"])
    assert artifact.version == "2.1.0+7"
    assert artifact.format == f.ARTIFACT_FORMAT_MCUBOOT
    assert artifact.sha256 == hashlib.sha256(image).hexdigest()
    devices = await ota_devices(site, 4)
    district = unique("d")
    for device in devices:
        label(site.api, device.device_id, {"district": district})
    async with running(devices):
        started = campaign(
            site.api,
            artifact,
            f"district={district}",
            waves=[f.Wave(percent=50), f.Wave(percent=100)],
        )
        done = await until(site.api, started.name, lambda c: c.state == f.CAMPAIGN_STATE_COMPLETED)
    assert done.counts.succeeded == 4
    assert [w.status for w in done.wave_status] == ["passed", "passed"]
    assert {e.state for e in executions(site.api, started.name)} == {f.EXECUTION_STATE_SUCCEEDED}
    for device in devices:
        twin = json_format.MessageToDict(twin_of(site, device.device_id))
        assert twin["reported"]["firmware"]["version"] == "2.1.0+7"
        # Only the version stays desired once the job is done: the twin is in sync.
        assert twin["desired"]["firmware"] == {"version": "2.1.0+7"}
        assert device.blocks_fetched == list(range(-(-len(image) // 1024)))
    events = site.api.call(
        site.api.campaigns.ListCampaignEvents, f.ListCampaignEventsRequest(parent=started.name)
    ).events
    assert [e.action for e in events] == ["created", "started", "wave-passed", "completed"]


async def test_only_assigned_devices_download_and_from_any_block(
    site: Site, tmp_path: Path
) -> None:
    release = Release(site.api, tmp_path)
    image = release.mcuboot("3.0.0", 30_000)
    artifact = upload(site.api, image)
    (device,) = await ota_devices(site, 1)
    async with coap_client(site.trust, device.cert, device.key) as context:
        refused = await request(context, site.coaps + f"/fw/{artifact.sha256}")
        assert refused.code == Code.FORBIDDEN
        missing = await request(context, site.coaps + "/fw/" + "0" * 64)
        assert missing.code == Code.NOT_FOUND
        key = await request(context, site.coaps + "/fw/manifest-key")
        assert key.code == Code.CONTENT and b"PUBLIC KEY" in key.payload
        await device.report(context, {"firmware": {"version": "1.0.0"}})
        started = campaign(site.api, artifact, f"id={device.device_id}")
        await until(site.api, started.name, lambda c: c.counts.in_progress == 1)
        # A device resuming a broken download asks for the block it stopped at first.
        tail = await device.download(context, f"/fw/{artifact.sha256}", first_block=7)
        assert tail == image[7 * 1024 :]
        past = await request(context, site.coaps + f"/fw/{artifact.sha256}", block2=(100, False, 6))
        assert past.code == Code.BAD_REQUEST and b"past the end" in past.payload
    with pytest.raises(grpc.RpcError) as in_use:
        site.api.call(site.api.firmware.DeleteArtifact, f.DeleteArtifactRequest(name=artifact.name))
    assert in_use.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    unused = upload(site.api, release.mcuboot("3.0.1"))
    site.api.call(site.api.firmware.DeleteArtifact, f.DeleteArtifactRequest(name=unused.name))
    with pytest.raises(grpc.RpcError) as gone:
        site.api.call(site.api.firmware.GetArtifact, f.GetArtifactRequest(name=unused.name))
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND


def test_api_callers_cannot_write_the_firmware_job(site: Site) -> None:
    device_id = site.enroll_code(unique("SN"))[0]
    with pytest.raises(grpc.RpcError) as refused:
        set_desired(site.api, device_id, {"firmware": {"version": "9.9.9"}})
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "campaigns" in refused.value.details()


async def test_failing_wave_pauses_and_starts_no_further_device(site: Site, tmp_path: Path) -> None:
    release = Release(site.api, tmp_path)
    artifact = upload(site.api, release.mcuboot("2.2.0"))
    devices = await ota_devices(site, 6, misbehaviour=Misbehaviour(fail_reason="install_error"))
    ids = ",".join(d.device_id for d in devices)
    async with running(devices):
        started = campaign(
            site.api,
            artifact,
            f"id in ({ids})",
            waves=[f.Wave(device_count=2, min_finished=2), f.Wave(percent=100)],
        )
        paused = await until(site.api, started.name, lambda c: c.state == f.CAMPAIGN_STATE_PAUSED)
        await asyncio.sleep(2)
    assert "failed" in paused.state_reason
    assert paused.wave_status[0].status == "failed"
    states = [e.state for e in executions(site.api, started.name)]
    assert states[:2] == [f.EXECUTION_STATE_FAILED] * 2
    assert states[2:] == [f.EXECUTION_STATE_PENDING] * 4
