"""Campaigns against what goes wrong: refused uploads, silent and reverting devices, closed
maintenance windows, a server killed mid-rollout or between a campaign's abort and its
rollback, and two replicas sharing one database."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest

from citytwin.v1 import firmware_pb2 as f
from tests.coap_devices import Site, fleet_trust, twin_of
from tests.conftest import PG_DSN, Api, Database, Server, run_cli
from tests.firmware_ota.ota_devices import Misbehaviour, Release, ota_devices, running, upload
from tests.firmware_ota.signing_fixtures import imgtool_key, sign_detached
from tests.firmware_ota.test_campaign_control import _rollback_of
from tests.firmware_ota.test_campaigns_end_to_end import campaign, executions, until
from twin.failpoints import FAILPOINT_EXIT_CODE


def refused(api: Api, image: bytes, **metadata: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as error:
        upload(api, image, **metadata)
    return error.value


def test_bad_uploads_are_refused_with_the_reason_and_leave_nothing(
    site: Site, tmp_path: Path
) -> None:
    release = Release(site.api, tmp_path)
    image = bytearray(release.mcuboot("4.0.0"))
    image[0x300] ^= 0x01
    tampered = refused(site.api, bytes(image))
    assert tampered.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "tampered" in tampered.details()
    stranger = imgtool_key(tmp_path, "ecdsa-p256")
    body = os.urandom(4096)
    unsigned = refused(site.api, body, version="1.0.0")
    assert "detached signature" in unsigned.details()
    foreign = refused(site.api, body, version="1.0.0", signature=sign_detached(body, stranger))
    assert "does not verify" in foreign.details()
    short = refused(site.api, body, version="1.0.0", size_bytes=5000)
    assert "5000" in short.details()
    oversize = refused(site.api, body, version="1.0.0", size_bytes=1 << 30)
    assert "size limit" in oversize.details()
    for refused_image in (bytes(image), body):
        name = f"artifacts/{hashlib.sha256(refused_image).hexdigest()}"
        with pytest.raises(grpc.RpcError) as missing:
            site.api.call(site.api.firmware.GetArtifact, f.GetArtifactRequest(name=name))
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    accepted = upload(site.api, body, version="1.0.1", signature=sign_detached(body, release.key))
    assert accepted.format == f.ARTIFACT_FORMAT_BINARY
    again = upload(site.api, body, version="1.0.1", signature=sign_detached(body, release.key))
    assert again.name == accepted.name


def test_release_engineers_upload_but_do_not_trust_keys(
    site: Site, deployment: object, tmp_path: Path
) -> None:
    engineer = deployment.api("release-engineer")  # type: ignore[attr-defined]
    key = imgtool_key(tmp_path, "ed25519")
    with pytest.raises(grpc.RpcError) as denied:
        engineer.call(
            engineer.firmware.CreateReleaseKey,
            f.CreateReleaseKeyRequest(public_key=key.pem_path.read_bytes()),
        )
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    release = Release(site.api, tmp_path)
    artifact = upload(engineer, release.mcuboot("5.0.0"))
    assert artifact.uploaded_by.startswith("tokens/")


async def test_silent_devices_time_out_after_their_retries(site: Site, tmp_path: Path) -> None:
    release = Release(site.api, tmp_path)
    artifact = upload(site.api, release.mcuboot("2.3.0"))
    devices = await ota_devices(site, 2, misbehaviour=Misbehaviour(silent=True))
    reverting = await ota_devices(site, 1, misbehaviour=Misbehaviour(revert=True))
    ids = ",".join(d.device_id for d in devices + reverting)
    async with running(devices + reverting):
        started = campaign(
            site.api,
            artifact,
            f"id in ({ids})",
            waves=[f.Wave(percent=100, min_finished=3, failure_threshold=1.0)],
            device_timeout_seconds=2,
            max_attempts=2,
            retry_backoff_seconds=1,
        )
        paused = await until(
            site.api, started.name, lambda c: c.state == f.CAMPAIGN_STATE_PAUSED, 40
        )
    by_device = {e.device: e for e in executions(site.api, started.name)}
    for device in devices:
        execution = by_device[f"devices/{device.device_id}"]
        assert execution.state == f.EXECUTION_STATE_TIMED_OUT
        assert (execution.attempt, execution.failure_reason) == (2, "timeout")
    (reverted,) = (by_device[f"devices/{d.device_id}"] for d in reverting)
    assert (reverted.state, reverted.failure_reason) == (f.EXECUTION_STATE_FAILED, "reverted")
    assert "operator" in paused.state_reason
    # A failed job is withdrawn from the device's desired state.
    twin = twin_of(site, reverting[0].device_id)
    assert "firmware" not in twin.desired


def _window_not_now() -> str:
    later = datetime.now(UTC) + timedelta(hours=12)
    return f"{later:%H}:00-{later:%H}:30"


async def test_maintenance_windows_hold_downloads_and_installs(site: Site, tmp_path: Path) -> None:
    release = Release(site.api, tmp_path)
    artifact = upload(site.api, release.mcuboot("2.4.0"))
    devices = await ota_devices(site, 4)
    first, second = devices[:2], devices[2:]
    async with running(devices):
        night_only = campaign(
            site.api,
            artifact,
            f"id in ({','.join(d.device_id for d in first)})",
            download_windows=[_window_not_now()],
            time_zone="UTC",
        )
        by_day = campaign(
            site.api,
            artifact,
            f"id in ({','.join(d.device_id for d in second)})",
            install_windows=[_window_not_now()],
            time_zone="UTC",
            waves=[f.Wave(percent=100)],
        )
        await until(
            site.api,
            by_day.name,
            lambda c: (
                c.counts.in_progress == 2
                and all(
                    e.state == f.EXECUTION_STATE_DOWNLOADED for e in executions(site.api, c.name)
                )
            ),
        )
        await asyncio.sleep(1.5)
    assert {e.state for e in executions(site.api, night_only.name)} == {f.EXECUTION_STATE_PENDING}
    for device in second:
        assert device.version == "1.0.0"
        assert twin_of(site, device.device_id).desired["firmware"]["action"] == "download"
        assert twin_of(site, device.device_id).reported["firmware"]["state"] == "downloaded"


@pytest.fixture
def own_server(fresh_db: Database) -> Iterator[tuple[Server, str]]:
    token = run_cli(fresh_db, "token", "create", "--role", "admin").stdout.strip()
    server = Server(fresh_db, extra_env=_FAST).start()
    try:
        yield server, token
    finally:
        server.stop()


_FAST = {"CITYTWIN_CAMPAIGN_PASS": "0.2", "CITYTWIN_CAMPAIGN_LEASE": "3"}


def _site(server: Server, token: str, db: Database) -> Site:
    return Site(server, Api(grpc.insecure_channel(server.address), token), fleet_trust(db))


def _no_double_counting(api: Api, name: str, devices: int) -> None:
    done = api.call(api.campaigns.GetCampaign, f.GetCampaignRequest(name=name))
    assert done.state == f.CAMPAIGN_STATE_COMPLETED
    assert (done.counts.total, done.counts.succeeded) == (devices, devices)
    events = api.call(
        api.campaigns.ListCampaignEvents, f.ListCampaignEventsRequest(parent=name)
    ).events
    actions = Counter(e.action for e in events)
    assert actions["completed"] == 1 and actions["started"] == 1
    assert actions["wave-passed"] == len(done.waves) - 1


async def test_a_server_killed_mid_rollout_resumes_where_it_was(
    own_server: tuple[Server, str], fresh_db: Database, tmp_path: Path
) -> None:
    server, token = own_server
    site = _site(server, token, fresh_db)
    artifact = upload(site.api, Release(site.api, tmp_path).mcuboot("2.5.0", 60_000))
    devices = await ota_devices(site, 6)
    async with running(devices):
        started = campaign(
            site.api,
            artifact,
            "kind=lamp",
            waves=[f.Wave(device_count=2, min_finished=2), f.Wave(percent=100)],
            rate_limits=f.RateLimits(max_concurrent=2),
            device_timeout_seconds=60,
            retry_backoff_seconds=1,
        )
        await until(site.api, started.name, lambda c: c.counts.succeeded >= 3)
        server.kill()
    server.start()
    site = _site(server, token, fresh_db)
    for device in devices:
        device.site = site
    async with running(devices):
        await until(site.api, started.name, lambda c: c.state == f.CAMPAIGN_STATE_COMPLETED)
    _no_double_counting(site.api, started.name, 6)
    for device in devices:
        installs = [job for job in device.jobs_done if job[2] == "install"]
        assert len(installs) == 1, device.jobs_done


async def test_a_crash_between_abort_and_rollback_leaves_neither_half(
    own_server: tuple[Server, str], fresh_db: Database, tmp_path: Path
) -> None:
    """The server dies (a fail point) right after the driver aborts a failed campaign whose
    wave says roll back, before the rollback campaign exists. Abort and rollback are one
    transaction, so neither is left: the restarted server judges the wave again, and the
    campaign ends aborted with its rollback, never aborted without one."""
    server, token = own_server
    server.stop()
    server.extra_env = {**_FAST, "CITYTWIN_FAILPOINTS": "campaign-driver.aborted"}
    server.start()
    site = _site(server, token, fresh_db)
    release = Release(site.api, tmp_path)
    upload(site.api, release.mcuboot("1.0.0"))
    new = upload(site.api, release.mcuboot("3.7.0"))
    good = await ota_devices(site, 1)
    bad = await ota_devices(site, 1, misbehaviour=Misbehaviour(fail_reason="install_error"))
    devices = [*good, *bad]
    async with running(devices):
        failing = campaign(
            site.api,
            new,
            f"id in ({good[0].device_id},{bad[0].device_id})",
            waves=[f.Wave(percent=100, min_finished=2, on_failure=f.FAILURE_ACTION_ROLLBACK)],
        )
        assert server.process is not None
        assert await asyncio.to_thread(server.process.wait, 120) == FAILPOINT_EXIT_CODE
    server.extra_env = _FAST
    server.start()
    site = _site(server, token, fresh_db)
    for device in devices:
        device.site = site
    async with running(devices):
        aborted = await until(site.api, failing.name, lambda c: c.state == f.CAMPAIGN_STATE_ABORTED)
        rollback = await _rollback_of(site, failing.name)
        await until(site.api, rollback.name, lambda c: c.state == f.CAMPAIGN_STATE_COMPLETED)
    assert "failed" in aborted.state_reason
    assert good[0].version == "1.0.0" and bad[0].version == "1.0.0"
    events = site.api.call(
        site.api.campaigns.ListCampaignEvents, f.ListCampaignEventsRequest(parent=failing.name)
    ).events
    actions = Counter(e.action for e in events)
    assert actions["aborted"] == 1 and actions["rollback-created"] == 1, actions


@pytest.mark.skipif(not PG_DSN, reason="two replicas share PostgreSQL (CITYTWIN_TEST_PG)")
@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
async def test_two_replicas_never_drive_a_campaign_twice(
    own_server: tuple[Server, str], fresh_db: Database, tmp_path: Path
) -> None:
    first, token = own_server
    second = Server(fresh_db, extra_env=_FAST).start()
    try:
        site = _site(first, token, fresh_db)
        artifact = upload(site.api, Release(site.api, tmp_path).mcuboot("2.6.0"))
        devices = await ota_devices(site, 8)
        async with running(devices):
            started = campaign(
                site.api,
                artifact,
                "kind=lamp",
                waves=[f.Wave(device_count=2, min_finished=2), f.Wave(percent=100)],
                rate_limits=f.RateLimits(max_concurrent=3),
            )
            await until(site.api, started.name, lambda c: c.counts.succeeded >= 2)
            # Whichever replica drives it, losing the second one must not stop the rollout.
            second.kill()
            await until(site.api, started.name, lambda c: c.state == f.CAMPAIGN_STATE_COMPLETED)
        _no_double_counting(site.api, started.name, 8)
        assert {e.attempt for e in executions(site.api, started.name)} == {1}
    finally:
        second.stop()


def test_a_broken_upload_leaves_nothing_and_can_be_sent_again(site: Site, tmp_path: Path) -> None:
    release = Release(site.api, tmp_path)
    image = release.mcuboot("4.1.0", 100_000)

    def broken() -> Iterator[f.UploadArtifactRequest]:
        yield f.UploadArtifactRequest(
            metadata=f.ArtifactMetadata(display_name="lamp", size_bytes=len(image))
        )
        yield f.UploadArtifactRequest(chunk=image[:50_000])
        raise ConnectionResetError("the uploader's link went down")

    with pytest.raises(grpc.RpcError) as cut:
        site.api.call(site.api.firmware.UploadArtifact, broken())
    assert cut.value.code() == grpc.StatusCode.UNKNOWN
    digest = hashlib.sha256(image).hexdigest()
    with pytest.raises(grpc.RpcError) as missing:
        site.api.call(
            site.api.firmware.GetArtifact, f.GetArtifactRequest(name=f"artifacts/{digest}")
        )
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    assert upload(site.api, image).sha256 == digest
