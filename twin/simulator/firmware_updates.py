"""Firmware updates of a simulated device, after firmware_ota's device protocol, as pure
decisions: plain data in, plain data out, randomness from the `random.Random` passed in.

A device's firmware situation (`Firmware`: what it runs, how much storage it has, which job's
image it holds and how much of it, which instruction it has seen through) and the `firmware`
object of its desired state decide the next step (`decide`): nothing, refuse the job, download
(resuming from the bytes it holds), report a kept download, or install. Each step's outcome is
an `Update`: the new situation and the whole `firmware` object the device now reports.

Any change of the desired `firmware` object is a new instruction (a campaign bumps `attempt`
to have a failed job tried again); the instruction a device has seen through to its end is
remembered, so it is never repeated, until the job is withdrawn (the same job written again
later is a new instruction). A download that failed its checks is thrown away; one cut off by
a lost connection is kept, and the next try resumes where it stopped.

Failures are injected at their configured rates (`plan_download`, `plan_install`): a corrupted
download (its digest will not match), a connection lost mid-download, an install error, and
a bootloader that falls back to the old image after the reboot.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import random
import re
import struct
import uuid
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Final, NamedTuple, TypeGuard
from urllib.parse import urlsplit

from firmware_ota.mcuboot_images import IMAGE_MAGIC, TLV_PROT_INFO_MAGIC, TLV_SEC_CNT
from firmware_ota.suit_manifests import ManifestContent
from twin.merge_patch import JSON, Document, clone, json_equal

# The member of the desired and reported documents the protocol lives in.
FIRMWARE_MEMBER: Final = "firmware"
# The profiles' bound on `firmware.detail`.
MAX_DETAIL_LENGTH: Final = 256
# Progress is reported each time the download passes another quarter of the image.
PROGRESS_STEP_PERCENT: Final = 25
# Block sizes are 2**(exponent + 4) bytes (RFC 7959 section 2.2); 0 is the smallest, 16 bytes.
SMALLEST_BLOCK_EXPONENT: Final = 0
_BLOCK_EXPONENT_BIAS: Final = 4
_SHA256_HEX_LENGTH: Final = 64
_SHA256_HEX: Final = re.compile(f"[0-9a-f]{{{_SHA256_HEX_LENGTH}}}")

# MCUboot's image format (see firmware_ota.mcuboot_images), read only as far as a device needs
# to know what it will run: the header, then the protected TLV area with the security counter.
# magic, load address, header size, protected TLV size, image size, flags, version (major,
# minor, revision, build number), padding.
_MCUBOOT_HEADER: Final = struct.Struct("<IIHHIIBBHII")
# An area's magic and total size, and a TLV's type and length, alike.
_TLV_HEADER: Final = struct.Struct("<HH")
_SECURITY_COUNTER: Final = struct.Struct("<I")


class Action(StrEnum):
    """What a job asks for: keep the image ready, or install it too."""

    DOWNLOAD = "download"
    INSTALL = "install"


class UpdateState(StrEnum):
    """The reported `firmware.state` (LwM2M object 5, resource 3)."""

    IDLE = "idle"
    DOWNLOADING = "downloading"
    DOWNLOADED = "downloaded"
    UPDATING = "updating"


class Result(StrEnum):
    """The reported `firmware.result` (LwM2M object 5, resource 5)."""

    NONE = "none"
    SUCCESS = "success"
    FAILED = "failed"


class Reason(StrEnum):
    """The reported `firmware.reason` of a failed job."""

    INTEGRITY = "integrity"
    OUT_OF_STORAGE = "out_of_storage"
    UNSUPPORTED = "unsupported"
    CONNECTION_LOST = "connection_lost"
    INSTALL_ERROR = "install_error"
    REJECTED = "rejected"


_ACTIONS: Final = frozenset(Action)


class InstallOutcome(StrEnum):
    """How an installation ends: running the new image, failing before the reboot, or back
    on the old image because the bootloader fell back to it."""

    SUCCESS = "success"
    INSTALL_ERROR = "install_error"
    REVERTED = "reverted"


@dataclass(frozen=True)
class Job:
    """A desired `firmware` object that makes sense. `manifest` is the decoded SUIT envelope
    (empty if there is none); `instruction` is the object as the service wrote it."""

    sha256: str
    version: str
    size: int
    uri: str
    signature: str
    manifest: bytes
    action: Action
    attempt: int
    instruction: Document


@dataclass(frozen=True)
class Firmware:
    """A device's firmware situation. It runs `version` (the image with digest `image_sha256`,
    "" for the factory image, and `security_counter`, if it is an MCUboot image that has
    one), installed under a manifest with `manifest_sequence`. It holds `received` bytes of the
    image of job `job`, `verified` once they are whole and checked. `settled` is the desired
    `firmware` object it last saw through to a result."""

    version: str
    storage_bytes: int
    image_sha256: str = ""
    security_counter: int | None = None
    manifest_sequence: int = 0
    job: str = ""
    received: int = 0
    verified: bool = False
    settled: Document | None = None


@dataclass(frozen=True)
class Refusal:
    """Why a job failed, as reported: the reason and a line for operators."""

    reason: Reason
    detail: str


@dataclass(frozen=True)
class Withdrawn:
    """The desired state holds no job (none yet, or the campaign withdrew it, or left only
    the version it installed): forget the instruction last seen through."""


@dataclass(frozen=True)
class Refuse:
    """Report the job (`sha256`, `instruction`) failed at once, for `refusal`."""

    instruction: Document
    sha256: str
    refusal: Refusal


@dataclass(frozen=True)
class AlreadyRunning:
    """The device runs the job's image already: report success at once."""

    job: Job


@dataclass(frozen=True)
class Download:
    """Download the job's image from byte `offset` on (the bytes before it are held), check
    it, then keep or install it as the job says."""

    job: Job
    offset: int


@dataclass(frozen=True)
class Keep:
    """The job's image is downloaded and checked already and the job only asks for that:
    report it downloaded."""

    job: Job


@dataclass(frozen=True)
class Install:
    """The job's image is downloaded and checked already: install it."""

    job: Job


Decision = Withdrawn | Refuse | AlreadyRunning | Download | Keep | Install


class Update(NamedTuple):
    """The outcome of one step: the device's new situation and its reported `firmware`."""

    firmware: Firmware
    report: Document


@dataclass(frozen=True)
class DownloadPlan:
    """The failures one download will meet: the connection drops when `lose_connection_at`
    bytes are held, and the byte at `corrupt_at` arrives damaged (None: not at all)."""

    lose_connection_at: int | None = None
    corrupt_at: int | None = None


@dataclass(frozen=True)
class ImageIdentity:
    """What an image runs as once booted: its version and its security counter, if any."""

    version: str
    security_counter: int | None


def device_settings(desired: Document) -> Document:
    """`desired` without the firmware job: what a device takes over as it is. The job is an
    instruction, not a state to copy; what the device reports about it is its own."""
    return {key: value for key, value in desired.items() if key != FIRMWARE_MEMBER}


def read_job(instruction: Document) -> Job | Refusal:
    """The job in a desired `firmware` object, or why the device cannot take it (reason
    "unsupported"). `signature` and `manifest` may be absent (no detached signature, no
    manifest); `attempt` counts from 1."""
    sha256 = instruction.get("sha256")
    if not isinstance(sha256, str) or not _SHA256_HEX.fullmatch(sha256):
        return _unsupported("sha256 is not a SHA-256 digest in lowercase hex")
    version = instruction.get("version")
    if not isinstance(version, str) or not version:
        return _unsupported("the job has no target version")
    size = instruction.get("size")
    if not _is_int(size) or size < 0:
        return _unsupported(f"size {size!r} is not a number of bytes")
    uri = instruction.get("uri")
    if not isinstance(uri, str) or not uri.startswith("/"):
        return _unsupported(f"uri {uri!r} is not a path on the service")
    signature = instruction.get("signature", "")
    manifest = instruction.get("manifest", "")
    if not isinstance(signature, str) or not isinstance(manifest, str):
        return _unsupported("signature and manifest must be base64 text")
    action = instruction.get("action")
    if not isinstance(action, str) or action not in _ACTIONS:
        return _unsupported(f"action {action!r} is neither download nor install")
    attempt = instruction.get("attempt", 1)
    if not _is_int(attempt) or attempt < 1:
        return _unsupported(f"attempt {attempt!r} is not a positive integer")
    try:
        envelope = base64.b64decode(manifest, validate=True)
    except binascii.Error:
        return _unsupported("the manifest is not valid base64")
    return Job(
        sha256, version, size, uri, signature, envelope, Action(action), attempt, _copy(instruction)
    )


def decide(firmware: Firmware, instruction: JSON) -> Decision | None:
    """The next step for the desired `firmware` object `instruction`, or None for nothing.

    Withdrawn when there is no job (no object, or no `sha256` naming an image); nothing when
    this very instruction has been seen through already. A job the device cannot take is refused: a
    malformed one or a manifest that does not fit ("unsupported"), an image larger than the
    device's storage ("out_of_storage"). Otherwise: success at once if the device runs the
    image already; install or report it downloaded if it holds it whole and checked; else
    download it, resuming after the bytes it holds of the same image.
    """
    if not isinstance(instruction, dict) or not isinstance(instruction.get("sha256"), str):
        return None if firmware.settled is None else Withdrawn()
    if firmware.settled is not None and json_equal(instruction, firmware.settled):
        return None
    job = read_job(instruction)
    if isinstance(job, Refusal):
        # Reported as the job it names, within the length a digest has.
        named = str(instruction["sha256"])[:_SHA256_HEX_LENGTH]
        return Refuse(_copy(instruction), named, job)
    if job.sha256 == firmware.image_sha256:
        return AlreadyRunning(job)
    if job.size > firmware.storage_bytes:
        detail = f"the image needs {job.size} bytes; the device has {firmware.storage_bytes}"
        return Refuse(job.instruction, job.sha256, Refusal(Reason.OUT_OF_STORAGE, detail))
    held = firmware.job == job.sha256
    if held and firmware.verified:
        return Install(job) if job.action is Action.INSTALL else Keep(job)
    # Bytes held up to the very end, yet not checked (the link broke before the check): there
    # is no block left to ask for, so the download starts over.
    resume = firmware.received if held and firmware.received < job.size else 0
    return Download(job, resume)


def resume_block(offset: int, size_exponent: int) -> tuple[int, int]:
    """(block number, size exponent) of the Block2 request for the bytes from `offset` on:
    the largest block size up to 2**(size_exponent + 4) that `offset` is a multiple of, so
    that a download resumes exactly where it stopped even after the server chose smaller
    blocks than the device asked for."""
    exponent = size_exponent
    while exponent > SMALLEST_BLOCK_EXPONENT and offset % block_size(exponent):
        exponent -= 1
    return offset // block_size(exponent), exponent


def block_size(size_exponent: int) -> int:
    """The bytes in a block of size exponent `size_exponent` (RFC 7959 section 2.2)."""
    return 1 << (size_exponent + _BLOCK_EXPONENT_BIAS)


def progress(received: int, size: int) -> int:
    """Percent of an image of `size` bytes downloaded with `received` bytes held."""
    if size <= 0:
        return 100
    return min(100, received * 100 // size)


def progress_due(reported: int, now: int) -> bool:
    """Whether progress `now` is worth a report after `reported` was: it passed another
    PROGRESS_STEP_PERCENT mark short of the end (the whole image is reported "downloaded")."""
    return now < 100 and now // PROGRESS_STEP_PERCENT > reported // PROGRESS_STEP_PERCENT


def plan_download(
    offset: int,
    size: int,
    connection_loss_rate: float,
    integrity_failure_rate: float,
    rng: random.Random,
) -> DownloadPlan:
    """The failures a download of `size` bytes resuming at `offset` will meet: with
    `connection_loss_rate` the connection drops part way (after at least one more byte is
    in, so that a retry gets further), and with `integrity_failure_rate` one byte of the
    image arrives damaged."""
    lose = rng.random() < connection_loss_rate
    corrupt = rng.random() < integrity_failure_rate
    lose_at = offset + 1 + rng.randrange(size - offset - 1) if lose and size - offset > 1 else None
    corrupt_at = rng.randrange(size) if corrupt and size > 0 else None
    return DownloadPlan(lose_connection_at=lose_at, corrupt_at=corrupt_at)


def plan_install(
    install_failure_rate: float, revert_rate: float, rng: random.Random
) -> InstallOutcome:
    """How an installation ends: an install error with `install_failure_rate`; otherwise the
    device reboots, and its bootloader falls back to the old image with `revert_rate`."""
    if rng.random() < install_failure_rate:
        return InstallOutcome.INSTALL_ERROR
    if rng.random() < revert_rate:
        return InstallOutcome.REVERTED
    return InstallOutcome.SUCCESS


def read_mcuboot(image: bytes) -> ImageIdentity | None:
    """The version and security counter in an MCUboot image's header and protected TLVs, or
    None if `image` is not an MCUboot image. The version reads as imgtool takes it: `2.1.0`,
    with `+build` only for a non-zero build number."""
    if len(image) < _MCUBOOT_HEADER.size:
        return None
    magic, _, header_size, protected_size, body_size, _, major, minor, revision, build, _ = (
        _MCUBOOT_HEADER.unpack_from(image)
    )
    if magic != IMAGE_MAGIC:
        return None
    version = f"{major}.{minor}.{revision}" + (f"+{build}" if build else "")
    start = header_size + body_size
    if not protected_size or start + _TLV_HEADER.size > len(image):
        return ImageIdentity(version, None)
    tlv_magic, total = _TLV_HEADER.unpack_from(image, start)
    if tlv_magic != TLV_PROT_INFO_MAGIC:
        return ImageIdentity(version, None)
    end = min(start + total, len(image))
    position = start + _TLV_HEADER.size
    while position + _TLV_HEADER.size <= end:
        kind, length = _TLV_HEADER.unpack_from(image, position)
        value = position + _TLV_HEADER.size
        counter = kind == TLV_SEC_CNT and length == _SECURITY_COUNTER.size
        if counter and value + length <= end:
            return ImageIdentity(version, _SECURITY_COUNTER.unpack_from(image, value)[0])
        position = value + length
    return ImageIdentity(version, None)


def image_identity(job: Job, image: bytes) -> ImageIdentity:
    """What `image` will run as: an MCUboot image says so itself; any other runs as the
    job's target version."""
    return read_mcuboot(image) or ImageIdentity(job.version, None)


def check_image(firmware: Firmware, job: Job, image: bytes) -> Refusal | None:
    """Why the downloaded `image` cannot be installed, or None: its size or SHA-256 differs
    from the job's ("integrity"); without a detached signature it must be an MCUboot image
    ("unsupported"), whose security counter must not be below the running one's
    ("rejected": the bootloader would refuse the downgrade)."""
    if len(image) != job.size:
        return Refusal(Reason.INTEGRITY, f"received {len(image)} bytes; the job says {job.size}")
    digest = hashlib.sha256(image).hexdigest()
    if digest != job.sha256:
        return Refusal(Reason.INTEGRITY, f"the image's SHA-256 is {digest}, not the job's")
    if job.signature:
        return None
    mcuboot = read_mcuboot(image)
    if mcuboot is None:
        return Refusal(Reason.UNSUPPORTED, "no detached signature and not an MCUboot image")
    running = firmware.security_counter
    if running is not None and (mcuboot.security_counter or 0) < running:
        return Refusal(
            Reason.REJECTED,
            f"security counter {mcuboot.security_counter or 0} is below the running {running}",
        )
    return None


def manifest_problem(
    firmware: Firmware,
    job: Job,
    manifest: ManifestContent,
    vendor: uuid.UUID,
    device_class: uuid.UUID,
) -> Refusal | None:
    """Why a verified SUIT manifest does not authorise `job` on this device (of `vendor` and
    `device_class`), or None. It must be for this vendor and class of device and describe the
    job's image, size and location ("unsupported" otherwise); its sequence number must be
    above that of the manifest the running image came with ("rejected": a replay or a
    rollback)."""
    if manifest.vendor_id != vendor or manifest.class_id != device_class:
        return Refusal(Reason.UNSUPPORTED, "the manifest is for another vendor or device class")
    if manifest.image_sha256.hex() != job.sha256:
        return Refusal(Reason.UNSUPPORTED, "the manifest is for another image")
    if manifest.image_size != job.size:
        return Refusal(
            Reason.UNSUPPORTED,
            f"the manifest says {manifest.image_size} bytes; the job says {job.size}",
        )
    # A manifest names the image by path on the device's connection, or by full URI.
    if job.uri not in (manifest.uri, urlsplit(manifest.uri).path):
        return Refusal(Reason.UNSUPPORTED, f"the manifest fetches {manifest.uri[:100]}")
    if manifest.sequence_number <= firmware.manifest_sequence:
        return Refusal(
            Reason.REJECTED,
            f"manifest sequence number {manifest.sequence_number} is not above the running "
            f"image's {firmware.manifest_sequence}",
        )
    return None


def forget_settled(firmware: Firmware) -> Firmware:
    """The situation once the job is withdrawn: no instruction seen through any more (the
    image held stays, should the job come back)."""
    return replace(firmware, settled=None)


def reported(
    firmware: Firmware,
    job: str,
    state: UpdateState,
    percent: int,
    result: Result = Result.NONE,
    refusal: Refusal | None = None,
) -> Document:
    """The whole reported `firmware` object: the running version (and security counter, if
    any), then the job reported on, its state, progress and result, and with a failure its
    reason and detail."""
    report: Document = {"version": firmware.version}
    if firmware.security_counter is not None:
        report["security_counter"] = firmware.security_counter
    report.update(job=job, state=state.value, progress=percent, result=result.value)
    if refusal is not None:
        report.update(reason=refusal.reason.value, detail=refusal.detail[:MAX_DETAIL_LENGTH])
    return report


def downloading(firmware: Firmware, job: Job, offset: int) -> Update:
    """A download of `job` starts or resumes with `offset` bytes held; the result so far is
    "none" again."""
    now = replace(firmware, job=job.sha256, received=offset, verified=False)
    percent = progress(offset, job.size)
    return Update(now, reported(now, job.sha256, UpdateState.DOWNLOADING, percent))


def downloaded(firmware: Firmware, job: Job) -> Update:
    """The image is whole and checked. A job that asks for no more is seen through."""
    now = replace(firmware, job=job.sha256, received=job.size, verified=True)
    if job.action is Action.DOWNLOAD:
        now = replace(now, settled=job.instruction)
    return Update(now, reported(now, job.sha256, UpdateState.DOWNLOADED, 100))


def updating(firmware: Firmware, job: Job) -> Update:
    """Installation starts."""
    return Update(firmware, reported(firmware, job.sha256, UpdateState.UPDATING, 100))


def already_running(firmware: Firmware, job: Job) -> Update:
    """The job asks for the image the device runs: done, and seen through."""
    now = replace(firmware, settled=job.instruction)
    return Update(now, reported(now, job.sha256, UpdateState.IDLE, 100, Result.SUCCESS))


def failed(
    firmware: Firmware,
    instruction: Document,
    sha256: str,
    refusal: Refusal,
    *,
    discard_image: bool = False,
) -> Update:
    """The job failed, for `refusal`: seen through (only a changed instruction, such as a
    bumped attempt, tries again). The image held is kept for that try, unless
    `discard_image` (it failed its checks)."""
    now = replace(firmware, settled=_copy(instruction))
    if discard_image:
        now = replace(now, job="", received=0, verified=False)
    percent = progress(now.received, _size_of(instruction)) if now.job == sha256 else 0
    return Update(now, reported(now, sha256, UpdateState.IDLE, percent, Result.FAILED, refusal))


def booted(
    firmware: Firmware,
    job: Job,
    outcome: InstallOutcome,
    identity: ImageIdentity,
    manifest_sequence: int,
) -> Update:
    """After the reboot into `job`'s image: running it, with `identity` (the image held is
    spent), or, when the bootloader fell back, back on the old version and failed."""
    if outcome is not InstallOutcome.SUCCESS:
        refusal = Refusal(
            Reason.INSTALL_ERROR,
            f"the bootloader fell back to {firmware.version}: the new image did not confirm itself",
        )
        return failed(firmware, job.instruction, job.sha256, refusal)
    now = replace(
        firmware,
        version=identity.version,
        image_sha256=job.sha256,
        security_counter=identity.security_counter,
        manifest_sequence=max(firmware.manifest_sequence, manifest_sequence),
        job="",
        received=0,
        verified=False,
        settled=job.instruction,
    )
    return Update(now, reported(now, job.sha256, UpdateState.IDLE, 100, Result.SUCCESS))


def _copy(document: Document) -> Document:
    return {key: clone(value) for key, value in document.items()}


def _unsupported(detail: str) -> Refusal:
    return Refusal(Reason.UNSUPPORTED, detail)


def _size_of(instruction: Document) -> int:
    size = instruction.get("size")
    return size if _is_int(size) else 0


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)
