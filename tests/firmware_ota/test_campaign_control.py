"""Steering campaigns: approval between waves, pause/resume/abort, rollback, downgrade refusal,
rate limits, continuous campaigns and the watch stream."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import pytest

from citytwin.v1 import firmware_pb2 as f
from tests.coap_devices import Site, coap_client, twin_of
from tests.firmware_ota.ota_devices import (
    Misbehaviour,
    OtaDevice,
    Release,
    label,
    ota_devices,
    running,
    upload,
)
from tests.firmware_ota.test_campaigns_end_to_end import campaign, executions, until


def _ids(devices: list[OtaDevice]) -> str:
    return f"id in ({','.join(d.device_id for d in devices)})"


async def _rollback_of(site: Site, name: str, limit: float = 60.0) -> f.Campaign:
    """The one campaign rolling back campaign `name`, once the driver has created it."""
    deadline = time.monotonic() + limit
    while True:
        listed = site.api.call(site.api.campaigns.ListCampaigns, f.ListCampaignsRequest())
        rollbacks = [c for c in listed.campaigns if c.rollback_of == name]
        if rollbacks:
            (rollback,) = rollbacks
            return rollback
        assert time.monotonic() < deadline, f"no rollback campaign of {name}"
        await asyncio.sleep(0.1)


def _action(site: Site, method: str, name: str) -> f.Campaign:
    call = getattr(site.api.campaigns, method)
    result: f.Campaign = site.api.call(call, f.CampaignActionRequest(name=name, reason="test"))
    return result


async def test_a_wave_waits_for_approval_then_the_campaign_completes(
    site: Site, tmp_path: Path
) -> None:
    artifact = upload(site.api, Release(site.api, tmp_path).mcuboot("3.1.0"))
    devices = await ota_devices(site, 3)
    async with running(devices):
        started = campaign(
            site.api,
            artifact,
            _ids(devices),
            waves=[
                f.Wave(device_count=1, min_finished=1, approval_required=True),
                f.Wave(percent=100),
            ],
        )
        waiting = await until(site.api, started.name, lambda c: c.state == f.CAMPAIGN_STATE_PAUSED)
        assert "approval" in waiting.state_reason
        assert [w.status for w in waiting.wave_status] == ["awaiting-approval", "pending"]
        await asyncio.sleep(1)
        # Still waiting after some passes of the driver: no device of the next wave started.
        still = site.api.call(
            site.api.campaigns.GetCampaign, f.GetCampaignRequest(name=started.name)
        )
        assert still.state == f.CAMPAIGN_STATE_PAUSED
        assert waiting.counts.pending == still.counts.pending == 2
        _action(site, "ResumeCampaign", started.name)
        done = await until(site.api, started.name, lambda c: c.state == f.CAMPAIGN_STATE_COMPLETED)
    assert done.counts.succeeded == 3


async def test_pause_resume_abort_and_refusals(site: Site, tmp_path: Path) -> None:
    artifact = upload(site.api, Release(site.api, tmp_path).mcuboot("3.2.0"))
    devices = await ota_devices(site, 4)
    created = site.api.call(
        site.api.campaigns.CreateCampaign,
        f.CreateCampaignRequest(
            campaign=f.Campaign(
                artifact=artifact.name,
                target_filter=_ids(devices),
                rate_limits=f.RateLimits(starts_per_minute=1),
                waves=[f.Wave(percent=100)],
            )
        ),
    )
    with pytest.raises(grpc.RpcError) as early:
        _action(site, "PauseCampaign", created.name)
    assert early.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    async with running(devices):
        _action(site, "StartCampaign", created.name)
        await until(site.api, created.name, lambda c: c.counts.succeeded == 1)
        paused = _action(site, "PauseCampaign", created.name)
        assert paused.state == f.CAMPAIGN_STATE_PAUSED
        aborted = _action(site, "AbortCampaign", created.name)
    assert aborted.state == f.CAMPAIGN_STATE_ABORTED
    states = sorted(e.state for e in executions(site.api, created.name))
    assert states.count(f.EXECUTION_STATE_SUCCEEDED) == 1
    assert states.count(f.EXECUTION_STATE_CANCELLED) == 3
    await until(site.api, created.name, lambda c: c.counts.in_progress == 0)
    for execution in executions(site.api, created.name):
        if execution.state == f.EXECUTION_STATE_CANCELLED:
            device_id = execution.device.removeprefix("devices/")
            assert "firmware" not in twin_of(site, device_id).desired
    with pytest.raises(grpc.RpcError) as late:
        _action(site, "ResumeCampaign", created.name)
    assert late.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "aborted" in late.value.details()
    events = site.api.call(
        site.api.campaigns.ListCampaignEvents, f.ListCampaignEventsRequest(parent=created.name)
    ).events
    assert [e.action for e in events] == ["created", "started", "paused", "aborted"]
    assert all(e.actor.startswith("tokens/") for e in events)


async def test_rollback_reinstalls_the_old_version_on_exactly_the_updated_devices(
    site: Site, tmp_path: Path
) -> None:
    release = Release(site.api, tmp_path)
    old = upload(site.api, release.mcuboot("1.0.0"))
    new = upload(site.api, release.mcuboot("3.3.0"))
    devices = await ota_devices(site, 3)
    bystander = (await ota_devices(site, 1))[0]
    async with running([*devices, bystander]):
        forward = campaign(site.api, new, _ids(devices), waves=[f.Wave(percent=100)])
        await until(site.api, forward.name, lambda c: c.state == f.CAMPAIGN_STATE_COMPLETED)
        back = site.api.call(
            site.api.campaigns.RollbackCampaign,
            f.RollbackCampaignRequest(name=forward.name, artifact=old.name),
        )
        assert back.rollback_of == forward.name and back.allow_downgrade
        _action(site, "StartCampaign", back.name)
        done = await until(site.api, back.name, lambda c: c.state == f.CAMPAIGN_STATE_COMPLETED)
    assert done.counts.succeeded == 3
    assert {d.version for d in devices} == {"1.0.0"}
    assert {e.device for e in executions(site.api, back.name)} == {
        f"devices/{d.device_id}" for d in devices
    }


async def test_a_downgrade_is_skipped_unless_allowed(site: Site, tmp_path: Path) -> None:
    artifact = upload(site.api, Release(site.api, tmp_path).mcuboot("0.9.0"))
    devices = await ota_devices(site, 2, version="1.0.0")
    async with running(devices):
        refused = campaign(site.api, artifact, _ids(devices), waves=[f.Wave(percent=100)])
        await until(site.api, refused.name, lambda c: c.state == f.CAMPAIGN_STATE_COMPLETED)
        (skipped,) = {(e.state, e.failure_reason) for e in executions(site.api, refused.name)}
        assert skipped == (f.EXECUTION_STATE_SKIPPED, "downgrade")
        allowed = campaign(
            site.api, artifact, _ids(devices), waves=[f.Wave(percent=100)], allow_downgrade=True
        )
        done = await until(site.api, allowed.name, lambda c: c.state == f.CAMPAIGN_STATE_COMPLETED)
    assert done.counts.succeeded == 2


async def test_starts_per_minute_are_limited(site: Site, tmp_path: Path) -> None:
    artifact = upload(site.api, Release(site.api, tmp_path).mcuboot("3.4.0"))
    devices = await ota_devices(site, 4)
    async with running(devices):
        started = campaign(
            site.api,
            artifact,
            _ids(devices),
            waves=[f.Wave(percent=100)],
            rate_limits=f.RateLimits(starts_per_minute=2),
        )
        await until(site.api, started.name, lambda c: c.counts.succeeded == 2)
        await asyncio.sleep(2)
        now = site.api.call(site.api.campaigns.GetCampaign, f.GetCampaignRequest(name=started.name))
    assert (now.counts.succeeded, now.counts.pending) == (2, 2)


async def test_a_continuous_campaign_updates_devices_that_join_later(
    site: Site, tmp_path: Path
) -> None:
    artifact = upload(site.api, Release(site.api, tmp_path).mcuboot("3.5.0"))
    first = await ota_devices(site, 1)
    # Joiners are matched by a label, set after enrollment as an installer would.
    value = first[0].device_id
    label(site.api, first[0].device_id, {"wave": value})
    async with running(first):
        started = campaign(
            site.api, artifact, f"wave={value}", waves=[f.Wave(percent=100)], continuous=True
        )
        await until(site.api, started.name, lambda c: c.counts.succeeded == 1)
        later = await ota_devices(site, 1)
        label(site.api, later[0].device_id, {"wave": value})
        async with running(later):
            joined = await until(site.api, started.name, lambda c: c.counts.succeeded == 2)
    assert joined.state == f.CAMPAIGN_STATE_RUNNING  # continuous: ends only when aborted
    assert later[0].version == "3.5.0"


async def test_watch_streams_progress_until_the_campaign_ends(site: Site, tmp_path: Path) -> None:
    artifact = upload(site.api, Release(site.api, tmp_path).mcuboot("3.6.0"))
    devices = await ota_devices(site, 2)
    async with running(devices):
        started = campaign(site.api, artifact, _ids(devices), waves=[f.Wave(percent=100)])
        stream = site.api.call(
            site.api.campaigns.WatchCampaign, f.GetCampaignRequest(name=started.name), timeout=60
        )
        seen = await asyncio.to_thread(lambda: [(c.state, c.counts.succeeded) for c in stream])
    assert seen[-1] == (f.CAMPAIGN_STATE_COMPLETED, 2)
    assert len(seen) >= 2


async def test_a_wave_that_fails_with_rollback_rolls_the_updated_devices_back(
    site: Site, tmp_path: Path
) -> None:
    release = Release(site.api, tmp_path)
    upload(site.api, release.mcuboot("1.0.0"))
    new = upload(site.api, release.mcuboot("3.7.0"))
    good = await ota_devices(site, 1)
    bad = await ota_devices(site, 1, misbehaviour=Misbehaviour(fail_reason="install_error"))
    async with running([*good, *bad]):
        failing = campaign(
            site.api,
            new,
            _ids([*good, *bad]),
            waves=[f.Wave(percent=100, min_finished=2, on_failure=f.FAILURE_ACTION_ROLLBACK)],
        )
        aborted = await until(site.api, failing.name, lambda c: c.state == f.CAMPAIGN_STATE_ABORTED)
        # The driver creates the rollback campaign just after committing the abort.
        rollback = await _rollback_of(site, failing.name)
        await until(site.api, rollback.name, lambda c: c.state == f.CAMPAIGN_STATE_COMPLETED)
    assert "failed" in aborted.state_reason
    assert good[0].version == "1.0.0" and bad[0].version == "1.0.0"
    (execution,) = executions(site.api, rollback.name)
    assert execution.device == f"devices/{good[0].device_id}"
    assert execution.state == f.EXECUTION_STATE_SUCCEEDED


async def test_the_security_counter_never_goes_down_even_when_downgrades_are_allowed(
    site: Site, tmp_path: Path
) -> None:
    release = Release(site.api, tmp_path)
    artifact = upload(site.api, release.mcuboot("3.8.0", 20_000, "--security-counter", "3"))
    assert artifact.security_counter == 3
    (device,) = await ota_devices(site, 1)
    async with running([device]):
        async with coap_client(site.trust, device.cert, device.key) as context:
            await device.report(context, {"firmware": {"security_counter": 5}})
        started = campaign(
            site.api, artifact, _ids([device]), waves=[f.Wave(percent=100)], allow_downgrade=True
        )
        await until(site.api, started.name, lambda c: c.state == f.CAMPAIGN_STATE_COMPLETED)
    (execution,) = executions(site.api, started.name)
    assert (execution.state, execution.failure_reason) == (f.EXECUTION_STATE_SKIPPED, "downgrade")
    assert "security counter" in execution.detail
