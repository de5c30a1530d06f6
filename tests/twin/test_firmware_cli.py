"""The release engineer's commands of `citytwin` (keys, firmware, campaign) against a real
server, with test devices that really update; plus the pure parts (names, wave options,
progress lines), which need no server."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import io
import subprocess
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

from citytwin.v1 import firmware_pb2 as f
from tests.coap_devices import Site
from tests.conftest import Deployment, unique
from tests.firmware_ota.ota_devices import Release, ota_devices, running, upload
from tests.firmware_ota.signing_fixtures import imgtool_key, sign_detached
from tests.twin.test_cli import citytwin, json_of, ok
from tests.twin.test_provisioning_cli import refused
from twin.cli.campaign_commands import (
    EXIT_ABORTED,
    EXIT_PAUSED,
    campaign_name,
    progress_line,
    ramp,
    wave_message,
    waves_from_args,
)
from twin.cli.firmware_commands import artifact_name, key_name
from twin.cli.main import main
from twin.errors import InvalidArgument

ENGINEER = "release-engineer"
# An MCUboot image's body starts after imgtool's --header-size 0x200.
BODY_OFFSET = 0x200


def cli(dep: Deployment, *args: str, role: str = ENGINEER) -> subprocess.CompletedProcess[str]:
    """`citytwin ARGS` against the deployment's server, run in this process: a separate one
    costs a second of imports. A few commands run as processes of their own all the same
    (`citytwin`), as people and release pipelines run them: an upload and a watch."""
    out, err = io.StringIO(), io.StringIO()
    argv = [*args, "--address", dep.server.address, "--token", dep.tokens[role]]
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exit_:
            # argparse refuses bad options this way.
            code = int(exit_.code or 0)
    return subprocess.CompletedProcess(["citytwin", *args], code, out.getvalue(), err.getvalue())


def campaign_id(campaign: dict[str, object]) -> str:
    """The bare id of a campaign printed as JSON."""
    return str(campaign["name"]).removeprefix("campaigns/")


def create_campaign(dep: Deployment, artifact: f.Artifact, target: str, *args: str) -> str:
    """`campaign create` as a release engineer; the new campaign's id."""
    created = json_of(
        cli(
            dep,
            "campaign",
            "create",
            "--artifact",
            artifact.sha256,
            "--target",
            target,
            *args,
            "--json",
        )
    )
    return campaign_id(created)


def test_keys_add_list_and_delete(deployment: Deployment, tmp_path: Path) -> None:
    key = imgtool_key(tmp_path, "ecdsa-p256")
    path = str(key.pem_path)
    added = json_of(
        cli(deployment, "keys", "add", path, "--name", "lamps 2027", "--json", role="admin")
    )
    key_id = key.release_key.key_id
    assert added["key_id"] == key_id and added["algorithm"] == "KEY_ALGORITHM_ECDSA_P256"
    assert added["display_name"] == "lamps 2027" and "PRIVATE" not in added["public_key_pem"]
    refused(cli(deployment, "keys", "add", path), "PERMISSION_DENIED")

    listing = ok(cli(deployment, "keys", "list"))
    assert key_id in listing and "ecdsa_p256" in listing and "lamps 2027" in listing
    assert ok(cli(deployment, "keys", "delete", f"releaseKeys/{key_id}", role="admin")) == (
        f"deleted releaseKeys/{key_id}\n"
    )
    remaining = json_of(cli(deployment, "keys", "list", "--json", role="admin"))
    assert key_id not in {k["key_id"] for k in remaining}


def test_upload_signed_image_and_refuse_a_tampered_one(
    deployment: Deployment, tmp_path: Path
) -> None:
    release = Release(deployment.api(), tmp_path)
    image = release.mcuboot("2.1.0+7", 100_000)
    path = tmp_path / "lamp.signed.bin"
    path.write_bytes(image)
    sha = hashlib.sha256(image).hexdigest()
    out = ok(
        citytwin(
            deployment,
            *("firmware", "upload", str(path), "--name", "lamp-controller"),
            *("--kinds", "lamp", "--models", "lamp-led-dimmable", "--notes", "fixes dimming"),
            role=ENGINEER,
        )
    )
    assert "2.1.0+7" in out and sha in out and release.key.release_key.key_id in out
    # Not a terminal: no progress bar in the output.
    assert "uploading" not in out and "verifying" not in out
    shown = json_of(cli(deployment, "firmware", "show", f"artifacts/{sha}", "--json"))
    assert shown["format"] == "ARTIFACT_FORMAT_MCUBOOT" and int(shown["size_bytes"]) == len(image)
    assert shown["compatible_kinds"] == ["lamp"] and shown["release_notes"] == "fixes dimming"

    tampered = bytearray(release.mcuboot("2.1.1"))
    tampered[BODY_OFFSET + 100] ^= 0xFF
    path.write_bytes(tampered)
    result = cli(deployment, "firmware", "upload", str(path), "--name", "lamp-controller")
    assert "tampered" in refused(result, "INVALID_ARGUMENT")
    listed = json_of(cli(deployment, "firmware", "list", "--json"))
    shas = {a["sha256"] for a in listed}
    assert sha in shas and hashlib.sha256(tampered).hexdigest() not in shas


def test_upload_binary_with_detached_signature(deployment: Deployment, tmp_path: Path) -> None:
    release = Release(deployment.api(), tmp_path, key_type="ecdsa-p256")
    binary = tmp_path / "sensor.bin"
    binary.write_bytes(unique("sensor firmware").encode() * 1000)
    signature = tmp_path / "sensor.sig"
    signature.write_bytes(sign_detached(binary.read_bytes(), release.key))
    upload_binary = ("firmware", "upload", str(binary), "--name", "sensor", "--version", "1.4.0")

    unsigned = cli(deployment, *upload_binary)
    assert "detached signature" in refused(unsigned, "INVALID_ARGUMENT")
    artifact = json_of(cli(deployment, *upload_binary, "--signature", str(signature), "--json"))
    assert artifact["format"] == "ARTIFACT_FORMAT_BINARY" and artifact["version"] == "1.4.0"
    assert artifact["signing_key"] == f"releaseKeys/{release.key.release_key.key_id}"
    sha = artifact["sha256"]
    assert ok(cli(deployment, "firmware", "delete", sha)) == f"deleted artifacts/{sha}\n"
    refused(cli(deployment, "firmware", "show", sha), "NOT_FOUND")


def test_campaign_create_shows_waves_and_windows(deployment: Deployment, tmp_path: Path) -> None:
    artifact = upload(deployment.api(), Release(deployment.api(), tmp_path).mcuboot("3.1.0"))
    ident = create_campaign(
        deployment,
        artifact,
        f"district={unique('nowhere')}",
        *("--name", "night rollout", "--waves", "10%, 50%,100%", "--success-threshold", "0.9"),
        *("--approval", "--on-failure", "abort", "--max-concurrent", "5", "--ramp", "1,2,10"),
        *("--download-window", "22:00-06:00", "--install-window", "Mon-Fri 01:00-04:00"),
        *("--install-window", "Sat 02:00-05:00", "--time-zone", "Europe/Berlin"),
    )
    status = json_of(cli(deployment, "campaign", "status", ident, "--json"))
    assert status["state"] == "CAMPAIGN_STATE_DRAFT"
    assert [w["percent"] for w in status["waves"]] == [10, 50, 100]
    assert {(w["success_threshold"], w["approval_required"]) for w in status["waves"]} == {
        (0.9, True)
    }
    assert {w["on_failure"] for w in status["waves"]} == {"FAILURE_ACTION_ABORT"}
    assert status["rate_limits"]["max_concurrent"] == 5
    assert status["rate_limits"]["ramp_factor"] == 2
    assert status["install_windows"] == ["Mon-Fri 01:00-04:00", "Sat 02:00-05:00"]

    table = ok(cli(deployment, "campaign", "status", f"campaigns/{ident}"))
    for text in ("draft", "night rollout", "22:00-06:00", "Europe/Berlin", "50%", artifact.sha256):
        assert text in table
    listed = json_of(cli(deployment, "campaign", "list", "--json"))
    assert f"campaigns/{ident}" in {c["name"] for c in listed}


def test_bad_campaign_options_are_refused_with_the_reason(deployment: Deployment) -> None:
    def create(*args: str) -> subprocess.CompletedProcess[str]:
        result = cli(
            deployment,
            *("campaign", "create", "--artifact", "0" * 64, "--target", "kind=lamp", *args),
        )
        assert result.returncode == 2 and "Traceback" not in result.stderr
        return result

    assert "does not grow past an earlier 50%" in create("--waves", "50%,10%,100%").stderr
    assert "the last wave must be 100%" in create("--waves", "1%,10%").stderr
    assert "'ten%'" in create("--waves", "ten%,100%").stderr
    assert "FACTOR > 1" in create("--ramp", "1,0.5,3").stderr
    window = create("--download-window", "25:00-06:00")
    assert "INVALID_ARGUMENT" in window.stderr and "25:00" in window.stderr


async def test_campaign_runs_to_completion_under_watch(
    deployment: Deployment, site: Site, tmp_path: Path
) -> None:
    release = Release(site.api, tmp_path)
    old = upload(site.api, release.mcuboot("1.0.0"))
    new = upload(site.api, release.mcuboot("2.0.0"), compatible_kinds=["lamp"])
    devices = await ota_devices(site, 3)
    target = f"id in ({','.join(d.device_id for d in devices)})"
    async with running(devices):
        started = await asyncio.to_thread(
            cli,
            deployment,
            *("campaign", "create", "--artifact", f"artifacts/{new.sha256}", "--target", target),
            *("--waves", "1,100%", "--min-finished", "1", "--start", "--json"),
        )
        ident = campaign_id(json_of(started))
        watched = await asyncio.to_thread(citytwin, deployment, "campaign", "watch", ident)
    lines = ok(watched).splitlines()
    assert lines[-1].startswith("completed wave 2/2: 3 succeeded"), lines
    assert all(device.version == "2.0.0" for device in devices)

    status = ok(cli(deployment, "campaign", "status", ident))
    assert "completed" in status and "passed" in status
    succeeded = json_of(
        cli(deployment, "campaign", "executions", ident, "--state", "succeeded", "--json")
    )
    assert sorted(e["device"] for e in succeeded) == sorted(
        f"devices/{d.device_id}" for d in devices
    )
    events = ok(cli(deployment, "campaign", "events", ident))
    assert "started" in events and "completed" in events

    rollback = json_of(
        cli(deployment, "campaign", "rollback", ident, "--artifact", old.sha256, "--json")
    )
    assert rollback["state"] == "CAMPAIGN_STATE_DRAFT"
    assert rollback["rollback_of"] == f"campaigns/{ident}" and rollback["artifact"] == old.name


def test_pause_resume_abort_and_their_refusal(deployment: Deployment, tmp_path: Path) -> None:
    artifact = upload(deployment.api(), Release(deployment.api(), tmp_path).mcuboot("4.0.0"))
    # Registered but never connected: its update stays in progress, the campaign running.
    device_id = unique("lamp")
    lamp = ("--kind", "lamp", "--model", "lamp-led-dimmable", "--serial", unique("SN"))
    ok(cli(deployment, "devices", "create", *lamp, "--id", device_id, role="admin"))
    ident = create_campaign(deployment, artifact, f"id={device_id}", "--allow-downgrade")

    def act(action: str, *args: str) -> subprocess.CompletedProcess[str]:
        return cli(deployment, "campaign", action, ident, *args)

    assert "is draft; it cannot be paused" in refused(act("pause"), "FAILED_PRECONDITION")
    assert "running" in ok(act("start", "--reason", "go"))
    refused(act("start"), "FAILED_PRECONDITION")
    assert "paused" in ok(act("pause", "--reason", "checking the logs"))

    paused = cli(deployment, "campaign", "watch", ident)
    assert paused.returncode == EXIT_PAUSED, paused.stderr
    assert "checking the logs" in paused.stderr and f"campaign resume {ident}" in paused.stderr
    assert "running" in ok(act("resume"))
    aborted_at = json_of(act("abort", "--reason", "wrong image", "--json"))
    assert aborted_at["state"] == "CAMPAIGN_STATE_ABORTED"

    aborted = cli(deployment, "campaign", "watch", ident, "--json")
    assert aborted.returncode == EXIT_ABORTED, aborted.stderr
    assert '"CAMPAIGN_STATE_ABORTED"' in aborted.stdout.splitlines()[-1]
    assert "is aborted; it cannot be resumed" in refused(act("resume"), "FAILED_PRECONDITION")
    events = [e["action"] for e in json_of(act("events", "--json"))]
    assert events == ["created", "started", "paused", "resumed", "aborted"]


# --- no server ---------------------------------------------------------------------------


def test_names_take_ids_or_resource_names() -> None:
    sha = "ab" * 32
    assert artifact_name(sha.upper()) == artifact_name(f"artifacts/{sha}") == f"artifacts/{sha}"
    assert key_name(f"releaseKeys/{sha}") == f"releaseKeys/{sha}"
    assert campaign_name("12") == campaign_name(" campaigns/12 ") == "campaigns/12"
    for bad in ("campaigns/", "campaigns/x", "artifacts/12"):
        with pytest.raises(InvalidArgument, match="campaign id"):
            campaign_name(bad)
    with pytest.raises(InvalidArgument, match="SHA-256"):
        artifact_name("abc")


def test_wave_options_apply_to_every_wave() -> None:
    args = argparse.Namespace(
        waves="5,50%,100%",
        success_threshold=0.8,
        failure_threshold=None,
        min_finished=2,
        on_failure="rollback",
        approval=False,
    )
    waves = [wave_message(w) for w in waves_from_args(args)]
    assert [(w.device_count, w.percent) for w in waves] == [(5, 0), (0, 50), (0, 100)]
    assert {(w.success_threshold, w.failure_threshold, w.min_finished) for w in waves} == {
        (0.8, 0.1, 2)
    }
    assert {w.on_failure for w in waves} == {f.FAILURE_ACTION_ROLLBACK}
    defaults = waves_from_args(argparse.Namespace(**{**vars(args), "waves": None}))
    assert [str(w) for w in defaults] == ["1%", "10%", "50%", "100%"]
    assert ramp("0.5,1.5,20").ramp_every_succeeded == 20
    for bad in ("1,2", "1,1,5", "0,2,5", "a,b,c"):
        with pytest.raises(argparse.ArgumentTypeError):
            ramp(bad)


def test_progress_line_sums_up_the_campaign() -> None:
    campaign = f.Campaign(
        state=f.CAMPAIGN_STATE_RUNNING,
        state_reason="wave 2 started",
        current_wave=1,
        wave_status=[f.WaveStatus(index=0), f.WaveStatus(index=1)],
        counts=f.ExecutionCounts(total=10, succeeded=3, failed=1, in_progress=2, pending=4),
    )
    assert progress_line(campaign) == (
        "running wave 2/2: 3 succeeded, 1 failed, 2 in progress, 4 pending (wave 2 started)"
    )
    assert progress_line(f.Campaign(state=f.CAMPAIGN_STATE_DRAFT)) == "draft: no devices"
