"""Simulated firmware updates: the decisions a device takes about its firmware job, without a
server, then its resumable block-wise download against a small CoAP server in this process."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import socket
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiocoap
import aiocoap.resource
import pytest
from aiocoap.numbers.codes import Code
from aiocoap.optiontypes import BlockOption
from cryptography.hazmat.primitives.asymmetric import ec

from firmware_ota.suit_manifests import (
    CITYTWIN_VENDOR_DOMAIN,
    ManifestContent,
    build_envelope,
    class_id,
    read_envelope,
    vendor_id,
)
from tests.conftest import free_port
from tests.firmware_ota.signing_fixtures import imgtool_sign
from twin.cli.main import build_parser
from twin.simulator.devices import (
    MODELS,
    STORAGE_BYTES,
    Behaviour,
    ConnectionLost,
    FetchRefused,
    Kind,
    document_diff,
    download_image,
    follow_desired,
    new_state,
    with_firmware,
)
from twin.simulator.firmware_updates import (
    AlreadyRunning,
    Download,
    DownloadPlan,
    Firmware,
    ImageIdentity,
    Install,
    InstallOutcome,
    Job,
    Keep,
    Reason,
    Refusal,
    Refuse,
    Withdrawn,
    booted,
    check_image,
    decide,
    device_settings,
    downloaded,
    downloading,
    failed,
    image_identity,
    manifest_problem,
    plan_download,
    plan_install,
    progress,
    progress_due,
    read_job,
    resume_block,
    updating,
)

KIB = 1024
IMAGE = random.Random(0).randbytes(100 * KIB)
SHA = hashlib.sha256(IMAGE).hexdigest()
BLOCK_EXPONENT = 6
LAMP_VERSION = "2.0.3"


def job_object(image: bytes = IMAGE, **changes: Any) -> dict[str, Any]:
    """A desired `firmware` object as a campaign writes it."""
    sha256 = hashlib.sha256(image).hexdigest()
    job: dict[str, Any] = {
        "version": "2.1.0",
        "sha256": sha256,
        "size": len(image),
        "uri": f"/fw/{sha256}",
        "signature": "c2lnbmF0dXJl",
        "manifest": "",
        "action": "install",
        "attempt": 1,
    }
    return job | changes


def lamp_firmware(**changes: Any) -> Firmware:
    return Firmware(version=LAMP_VERSION, storage_bytes=STORAGE_BYTES[Kind.LAMP], **changes)


def job_of(instruction: dict[str, Any]) -> Job:
    job = read_job(instruction)
    assert isinstance(job, Job), job
    return job


def after_download(instruction: dict[str, Any]) -> Firmware:
    """A lamp holding the job's image whole and checked."""
    job = job_of(instruction)
    return downloaded(downloading(lamp_firmware(), job, 0).firmware, job).firmware


# --- decisions, without a server -------------------------------------------------------------


def test_a_job_is_downloaded_installed_and_reported_step_by_step() -> None:
    instruction = job_object()
    job = job_of(instruction)
    firmware = lamp_firmware()
    assert decide(firmware, instruction) == Download(job, 0)
    firmware, report = downloading(firmware, job, 0)
    base = {"version": LAMP_VERSION, "job": SHA}
    assert report == base | {"state": "downloading", "progress": 0, "result": "none"}
    firmware = replace(firmware, received=len(IMAGE))
    assert check_image(firmware, job, IMAGE) is None
    firmware, report = downloaded(firmware, job)
    assert report == base | {"state": "downloaded", "progress": 100, "result": "none"}
    firmware, report = updating(firmware, job)
    assert report == base | {"state": "updating", "progress": 100, "result": "none"}
    identity = image_identity(job, IMAGE)
    assert identity == ImageIdentity("2.1.0", None)
    firmware, report = booted(firmware, job, InstallOutcome.SUCCESS, identity, 0)
    assert report == {
        "version": "2.1.0",
        "job": SHA,
        "state": "idle",
        "progress": 100,
        "result": "success",
    }
    assert firmware.image_sha256 == SHA and firmware.received == 0
    # A finished job is not done again; asked again, the device runs it already.
    assert decide(firmware, instruction) is None
    again = job_object(attempt=2)
    assert decide(firmware, again) == AlreadyRunning(job_of(again))
    # The campaign leaves only the version it installed: the job is withdrawn.
    assert decide(firmware, {"version": "2.1.0"}) == Withdrawn()
    assert decide(lamp_firmware(), {"version": "2.1.0"}) is None


def test_a_download_only_job_is_kept_until_the_install_window_opens() -> None:
    instruction = job_object(action="download")
    firmware = after_download(instruction)
    assert firmware.settled == instruction
    assert decide(firmware, instruction) is None
    install = job_object(action="install")
    assert decide(firmware, install) == Install(job_of(install))
    # A new attempt of the download-only job finds the image held.
    again = job_object(action="download", attempt=2)
    assert decide(firmware, again) == Keep(job_of(again))


def test_a_corrupted_download_fails_its_integrity_check_and_starts_over() -> None:
    instruction = job_object()
    job = job_of(instruction)
    plan = plan_download(0, len(IMAGE), 0.0, 1.0, random.Random(1))
    assert plan.lose_connection_at is None and plan.corrupt_at is not None
    corrupted = bytearray(IMAGE)
    corrupted[plan.corrupt_at] ^= 0x01
    held = replace(downloading(lamp_firmware(), job, 0).firmware, received=len(IMAGE))
    refusal = check_image(held, job, bytes(corrupted))
    assert refusal is not None and refusal.reason is Reason.INTEGRITY
    firmware, report = failed(held, instruction, SHA, refusal, discard_image=True)
    assert report == {
        "version": LAMP_VERSION,
        "job": SHA,
        "state": "idle",
        "progress": 0,
        "result": "failed",
        "reason": "integrity",
        "detail": refusal.detail,
    }
    assert decide(firmware, instruction) is None
    retry = job_object(attempt=2)
    assert decide(firmware, retry) == Download(job_of(retry), 0)
    short = check_image(held, job, IMAGE[:-1])
    assert short is not None and short.reason is Reason.INTEGRITY


def test_a_lost_connection_keeps_the_blocks_and_the_retry_resumes_from_them() -> None:
    instruction = job_object()
    job = job_of(instruction)
    plan = plan_download(0, len(IMAGE), 1.0, 0.0, random.Random(2))
    assert plan.corrupt_at is None and plan.lose_connection_at is not None
    assert 0 < plan.lose_connection_at < len(IMAGE)
    # Planned again from where it stopped, the loss comes later still.
    later = plan_download(plan.lose_connection_at, len(IMAGE), 1.0, 0.0, random.Random(3))
    assert later.lose_connection_at is not None
    assert later.lose_connection_at > plan.lose_connection_at
    held = 37 * KIB
    cut_off = replace(downloading(lamp_firmware(), job, 0).firmware, received=held)
    # A real loss leaves the job unfinished: the same instruction resumes.
    assert decide(cut_off, instruction) == Download(job, held)
    lost = Refusal(Reason.CONNECTION_LOST, f"connection lost after {held} bytes")
    firmware, report = failed(cut_off, instruction, SHA, lost)
    assert report["reason"] == "connection_lost" and report["progress"] == 37
    # A reported loss waits for the service's bumped attempt, which resumes.
    assert decide(firmware, instruction) is None
    retry = job_object(attempt=2)
    decision = decide(firmware, retry)
    assert decision == Download(job_of(retry), held)
    assert resume_block(held, BLOCK_EXPONENT) == (37, BLOCK_EXPONENT)
    # Another image's bytes are no head start.
    other = job_object(image=IMAGE[::-1])
    assert decide(firmware, other) == Download(job_of(other), 0)
    # Every byte held but the check never ran (the link broke at the end): no block is left
    # to ask for, so the retry starts over instead of asking past the end.
    whole = replace(firmware, received=len(IMAGE))
    assert decide(whole, job_object(attempt=3)) == Download(job_of(job_object(attempt=3)), 0)


def test_blocks_resume_at_the_exact_byte_whatever_block_size_the_server_chose() -> None:
    assert resume_block(0, BLOCK_EXPONENT) == (0, 6)
    assert resume_block(100 * KIB, BLOCK_EXPONENT) == (100, 6)
    assert resume_block(3 * 512, BLOCK_EXPONENT) == (3, 5)
    assert resume_block(3 * 16, BLOCK_EXPONENT) == (3, 0)


def test_installations_fail_or_revert_at_their_rates() -> None:
    rng = random.Random(4)
    assert plan_install(1.0, 0.0, rng) is InstallOutcome.INSTALL_ERROR
    assert plan_install(0.0, 1.0, rng) is InstallOutcome.REVERTED
    assert {plan_install(0.0, 0.0, rng) for _ in range(100)} == {InstallOutcome.SUCCESS}
    assert {plan_download(0, 100, 0.0, 0.0, rng) for _ in range(100)} == {DownloadPlan()}
    instruction = job_object()
    job = job_of(instruction)
    held = after_download(instruction)
    error = Refusal(Reason.INSTALL_ERROR, "writing the image to its slot failed")
    firmware, report = failed(held, instruction, SHA, error)
    assert report["version"] == LAMP_VERSION and report["reason"] == "install_error"
    retry = job_object(attempt=2)
    # The image is still held: a retry installs it without downloading it again.
    assert decide(firmware, retry) == Install(job_of(retry))
    identity = image_identity(job, IMAGE)
    firmware, report = booted(held, job, InstallOutcome.REVERTED, identity, 0)
    assert report == {
        "version": LAMP_VERSION,
        "job": SHA,
        "state": "idle",
        "progress": 100,
        "result": "failed",
        "reason": "install_error",
        "detail": f"the bootloader fell back to {LAMP_VERSION}: the new image did not confirm "
        "itself",
    }
    assert firmware.version == LAMP_VERSION and firmware.image_sha256 == ""
    assert decide(firmware, instruction) is None


def test_jobs_a_device_cannot_take_are_refused() -> None:
    firmware = lamp_firmware()
    big = job_object(size=STORAGE_BYTES[Kind.LAMP] + 1)
    decision = decide(firmware, big)
    assert isinstance(decision, Refuse)
    assert decision.refusal.reason is Reason.OUT_OF_STORAGE
    _, report = failed(firmware, decision.instruction, decision.sha256, decision.refusal)
    assert report["result"] == "failed" and report["reason"] == "out_of_storage"
    for wrong in ({"action": "flash"}, {"size": -1}, {"uri": "fw"}, {"manifest": "%%"}):
        refused = decide(firmware, job_object(**wrong))
        assert isinstance(refused, Refuse) and refused.refusal.reason is Reason.UNSUPPORTED
    # Without a detached signature the image must be an MCUboot image.
    unsigned = job_object(signature="")
    refusal = check_image(firmware, job_of(unsigned), IMAGE)
    assert refusal is not None and refusal.reason is Reason.UNSUPPORTED


def test_mcuboot_images_say_what_they_run_and_may_not_go_back(tmp_path: Path) -> None:
    image = imgtool_sign(tmp_path, IMAGE[: 4 * KIB], "--security-counter", "7", version="2.1.0")
    job = job_of(job_object(image=image, signature=""))
    assert image_identity(job, image) == ImageIdentity("2.1.0", 7)
    assert check_image(lamp_firmware(security_counter=5), job, image) is None
    downgrade = check_image(lamp_firmware(security_counter=8), job, image)
    assert downgrade is not None and downgrade.reason is Reason.REJECTED
    identity = image_identity(job, image)
    firmware, report = booted(lamp_firmware(), job, InstallOutcome.SUCCESS, identity, 0)
    assert report["version"] == "2.1.0" and report["security_counter"] == 7
    assert firmware.security_counter == 7


def test_a_manifest_must_be_for_this_device_this_image_and_newer() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    vendor = vendor_id(CITYTWIN_VENDOR_DOMAIN)
    lamp_class = class_id(vendor, MODELS[Kind.LAMP])
    content = ManifestContent(
        vendor_id=vendor,
        class_id=lamp_class,
        sequence_number=1_700_000_000_000,
        image_sha256=bytes.fromhex(SHA),
        image_size=len(IMAGE),
        uri=f"/fw/{SHA}",
    )
    manifest = read_envelope(build_envelope(content, key), key.public_key())
    job = job_of(job_object())
    firmware = lamp_firmware()
    assert manifest_problem(firmware, job, manifest, vendor, lamp_class) is None
    sensor_class = class_id(vendor, MODELS[Kind.SENSOR])
    problems = [
        manifest_problem(firmware, job, manifest, vendor, sensor_class),
        manifest_problem(firmware, job, replace(manifest, image_size=1), vendor, lamp_class),
        manifest_problem(
            firmware, job, replace(manifest, image_sha256=bytes(32)), vendor, lamp_class
        ),
        manifest_problem(firmware, job, replace(manifest, uri="/fw/other"), vendor, lamp_class),
    ]
    assert [p.reason if p else None for p in problems] == [Reason.UNSUPPORTED] * 4
    newer = replace(firmware, manifest_sequence=manifest.sequence_number)
    replayed = manifest_problem(newer, job, manifest, vendor, lamp_class)
    assert replayed is not None and replayed.reason is Reason.REJECTED


def test_progress_is_reported_every_quarter() -> None:
    assert progress(256, 1024) == 25 and progress(0, 0) == 100
    assert [progress_due(0, p) for p in (10, 24, 25)] == [False, False, True]
    assert [progress_due(26, p) for p in (49, 50, 99, 100)] == [False, True, True, False]


def test_the_firmware_job_is_not_copied_into_the_reported_state() -> None:
    state = new_state(Kind.LAMP, random.Random(1), 0.0)
    followed = follow_desired(state, {"brightness": 30, "firmware": job_object()}, 0.0)
    assert followed.actual["firmware"] == {"version": LAMP_VERSION}
    assert followed.actual["brightness"] == 30
    assert device_settings({"firmware": job_object(), "power": True}) == {"power": True}
    # The device's own report replaces its whole firmware object: a past failure's reason goes.
    job = job_of(job_object())
    refusal = Refusal(Reason.INTEGRITY, "bad digest")
    failing = with_firmware(state, failed(lamp_firmware(), job.instruction, SHA, refusal).report)
    done = booted(lamp_firmware(), job, InstallOutcome.SUCCESS, image_identity(job, IMAGE), 0)
    succeeded = with_firmware(failing, done.report)
    assert document_diff(failing.actual, succeeded.actual) == {
        "firmware": {
            "version": "2.1.0",
            "progress": 100,
            "result": "success",
            "reason": None,
            "detail": None,
        }
    }


def test_firmware_behaviour_and_its_options() -> None:
    for wrong in ({"fw_revert_rate": 1.5}, {"fw_connection_loss_rate": -0.1}):
        with pytest.raises(ValueError):
            Behaviour(**wrong)
    with pytest.raises(ValueError):
        Behaviour(reboot_seconds=-1.0)
    args = build_parser().parse_args(
        [
            "simulate",
            *("--fw-integrity-failure-rate", "0.1", "--fw-connection-loss-rate", "0.2"),
            *("--fw-install-failure-rate", "0.3", "--fw-revert-rate", "0.4"),
            *("--reboot-seconds", "0.5"),
        ]
    )
    assert (
        args.fw_integrity_failure_rate,
        args.fw_connection_loss_rate,
        args.fw_install_failure_rate,
        args.fw_revert_rate,
        args.reboot_seconds,
    ) == (0.1, 0.2, 0.3, 0.4, 0.5)


# --- the download against a CoAP server ------------------------------------------------------

# The client gives up on an unanswered block after this; the test's server stays silent longer.
BLOCK_SECONDS = 0.5


class FlakyImage(aiocoap.resource.Resource):  # type: ignore[misc]
    """`/fw/<sha256>`: IMAGE, block by block in blocks of at most 2**(`exponent` + 4) bytes,
    except that the first request for block `drop` gets no answer (`failure` None) or a
    `failure` answer."""

    def __init__(self, exponent: int, drop: int, failure: Code | None) -> None:
        super().__init__()
        self.exponent = exponent
        self.drop: int | None = drop
        self.failure = failure
        self.requested: list[int] = []
        self.released = asyncio.Event()

    async def needs_blockwise_assembly(self, request: aiocoap.Message) -> bool:
        return False

    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        asked = request.opt.block2
        # Asked for larger blocks, a server answers with its own size (RFC 7959 section 2.3).
        exponent = min(asked.size_exponent, self.exponent)
        block = BlockOption.BlockwiseTuple(asked.start // (1 << (exponent + 4)), False, exponent)
        self.requested.append(block.block_number)
        if block.block_number == self.drop:
            self.drop = None
            if self.failure is not None:
                return aiocoap.Message(code=self.failure)
            await self.released.wait()
        payload = IMAGE[block.start : block.start + block.size]
        more = block.start + len(payload) < len(IMAGE)
        return aiocoap.Message(
            code=Code.CONTENT,
            payload=payload,
            block2=BlockOption.BlockwiseTuple(block.block_number, more, exponent),
        )


@contextlib.asynccontextmanager
async def serving(image: FlakyImage) -> AsyncIterator[tuple[aiocoap.Context, str]]:
    """A UDP CoAP server on 127.0.0.1 with `image` at /fw/SHA, and a client: (client, URI)."""
    site = aiocoap.resource.Site()
    site.add_resource(["fw", SHA], image)
    port = free_port(socket.SOCK_DGRAM)
    server = await aiocoap.Context.create_server_context(
        site, bind=("127.0.0.1", port), transports=["udp6"]
    )
    client = await aiocoap.Context.create_client_context(transports=["udp6"])
    try:
        yield client, f"coap://127.0.0.1:{port}/fw/{SHA}"
    finally:
        image.released.set()
        await client.shutdown()
        await server.shutdown()


@pytest.mark.parametrize(
    ("exponent", "failure"),
    [(6, None), (5, None), (6, Code.SERVICE_UNAVAILABLE)],
    ids=["silent", "silent-512-byte-blocks", "service-unavailable"],
)
async def test_a_download_resumes_from_the_block_it_lost(
    exponent: int, failure: Code | None
) -> None:
    block_size = 1 << (exponent + 4)
    blocks = len(IMAGE) // block_size
    drop = blocks * 37 // 100
    image_resource = FlakyImage(exponent, drop, failure)
    received: list[int] = []

    async def count(length: int) -> None:
        received.append(length)

    image = bytearray()
    async with serving(image_resource) as (client, uri):
        with pytest.raises(ConnectionLost):
            await download_image(
                client, uri, image, limit=len(IMAGE), after_block=count, block_seconds=BLOCK_SECONDS
            )
        assert image == IMAGE[: drop * block_size]
        await download_image(
            client, uri, image, limit=len(IMAGE), after_block=count, block_seconds=BLOCK_SECONDS
        )
    assert hashlib.sha256(image).hexdigest() == SHA
    # Block `drop` was asked for twice, and nothing before it again.
    assert image_resource.requested == [*range(drop + 1), *range(drop, blocks)]
    assert sum(received) == len(IMAGE) and len(received) == blocks


async def test_a_refused_download_fails_for_good() -> None:
    async with serving(FlakyImage(6, 3, Code.FORBIDDEN)) as (client, uri):
        with pytest.raises(FetchRefused) as refused:
            await download_image(client, uri, bytearray(), limit=len(IMAGE))
        assert refused.value.refusal.reason is Reason.UNSUPPORTED
        assert "4.03" in refused.value.refusal.detail
        # A server sending more than the job's size is cut off.
        with pytest.raises(FetchRefused) as oversized:
            await download_image(client, uri, bytearray(), limit=KIB)
        assert oversized.value.refusal.reason is Reason.INTEGRITY
