"""Whether an uploaded image may become an artifact (pure: bytes and keys in, verdict out).

An artifact is accepted only when a registered release key signed it: an MCUboot image carries
its signature, version and security counter itself (a version given at upload must agree with
the header); any other binary needs a detached signature and a version. Every refusal raises
`ArtifactRejected` or `InvalidArgument` naming the problem.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from firmware_ota.detached_signatures import verify_detached
from firmware_ota.mcuboot_images import looks_like_mcuboot, verify_mcuboot_image
from firmware_ota.release_keys import ReleaseKey
from firmware_ota.versions import parse_version
from twin.errors import ArtifactRejected, InvalidArgument

MAX_DISPLAY_NAME: Final = 100
MAX_RELEASE_NOTES: Final = 4000
MAX_COMPATIBLE: Final = 32
_NAME: Final = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
_SHA256_HEX: Final = re.compile(r"[0-9a-f]{64}")


class ArtifactFormat(StrEnum):
    """How an artifact is signed."""

    MCUBOOT = "mcuboot"
    BINARY = "binary"


@dataclass(frozen=True)
class UploadMetadata:
    """What the uploader says about an image (ArtifactMetadata in the API)."""

    display_name: str
    version: str = ""
    format: ArtifactFormat | None = None
    size: int = 0
    sha256: str = ""
    compatible_kinds: tuple[str, ...] = ()
    compatible_models: tuple[str, ...] = ()
    minimum_from_version: str = ""
    release_notes: str = ""
    signature: bytes = b""


@dataclass(frozen=True)
class AcceptedArtifact:
    """An image that passed every check, with what the service records about it."""

    sha256: str
    version: str
    format: ArtifactFormat
    size: int
    signing_key_id: str
    security_counter: int | None


def check_metadata(metadata: UploadMetadata, max_size: int) -> None:
    """InvalidArgument for metadata that is wrong whatever the image (checked before the
    image is received, so a bad upload is refused before its bytes travel)."""
    if not metadata.display_name or len(metadata.display_name) > MAX_DISPLAY_NAME:
        raise InvalidArgument(f"display_name is required, up to {MAX_DISPLAY_NAME} characters")
    if not 0 < metadata.size <= max_size:
        raise InvalidArgument(
            f"size_bytes must be between 1 and {max_size} (the artifact size limit), "
            f"not {metadata.size}"
        )
    if metadata.sha256 and not _SHA256_HEX.fullmatch(metadata.sha256):
        raise InvalidArgument("sha256 must be 64 lowercase hex digits")
    if metadata.version:
        parse_version(metadata.version)
    if metadata.minimum_from_version:
        parse_version(metadata.minimum_from_version)
    if len(metadata.release_notes) > MAX_RELEASE_NOTES:
        raise InvalidArgument(f"release_notes is longer than {MAX_RELEASE_NOTES} characters")
    for field, names in (
        ("compatible_kinds", metadata.compatible_kinds),
        ("compatible_models", metadata.compatible_models),
    ):
        if len(names) > MAX_COMPATIBLE:
            raise InvalidArgument(f"{field} lists more than {MAX_COMPATIBLE} entries")
        for name in names:
            if not _NAME.fullmatch(name):
                raise InvalidArgument(f"{field}: {name!r} is not a kind or model name")


def accept_image(
    metadata: UploadMetadata, image: bytes, keys: Sequence[ReleaseKey]
) -> AcceptedArtifact:
    """Check a whole uploaded image against its metadata and the registered release keys."""
    if len(image) != metadata.size:
        raise InvalidArgument(
            f"upload ended after {len(image)} bytes; size_bytes announced {metadata.size}"
        )
    digest = hashlib.sha256(image).hexdigest()
    if metadata.sha256 and metadata.sha256 != digest:
        raise ArtifactRejected(
            f"image digest {digest} differs from the announced sha256 {metadata.sha256}: "
            "the upload was corrupted"
        )
    if not keys:
        raise ArtifactRejected("no release keys are registered; an admin must add one first")
    fmt = metadata.format or (
        ArtifactFormat.MCUBOOT if looks_like_mcuboot(image) else ArtifactFormat.BINARY
    )
    if fmt is ArtifactFormat.MCUBOOT:
        if metadata.signature:
            raise InvalidArgument("an MCUboot image carries its own signature; send none")
        verified = verify_mcuboot_image(image, keys)
        if metadata.version and parse_version(metadata.version) != parse_version(verified.version):
            raise InvalidArgument(
                f"version {metadata.version} differs from the image header's {verified.version}"
            )
        return AcceptedArtifact(
            digest, verified.version, fmt, len(image), verified.key_id, verified.security_counter
        )
    if not metadata.version:
        raise InvalidArgument("version is required for a binary image")
    if not metadata.signature:
        raise ArtifactRejected("a binary image needs a detached signature by a release key")
    key = verify_detached(image, metadata.signature, keys)
    return AcceptedArtifact(digest, metadata.version, fmt, len(image), key.key_id, None)
