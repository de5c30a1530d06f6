"""Release keys and artifacts in the database.

An artifact's bytes are stored in fixed-size chunks so a block-wise download reads only the
chunk it needs, and every replica serves every artifact. An upload is gathered in memory
(bounded by the size limit and the number of uploads at once) and written in one transaction
after it passed every check: a broken or refused upload leaves nothing behind.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

from tortoise.exceptions import IntegrityError
from tortoise.transactions import in_transaction

from firmware_ota.artifact_acceptance import (
    AcceptedArtifact,
    ArtifactFormat,
    UploadMetadata,
    accept_image,
    check_metadata,
)
from firmware_ota.models import Artifact, ArtifactChunk, Campaign, ReleaseKeyRecord
from firmware_ota.release_keys import KeyAlgorithm, ReleaseKey, parse_public_key
from twin.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from twin.page_tokens import decode_page_token, page_size, split_page

# Stored chunk size: a multiple of every CoAP block size (16..1024), so a block never spans
# two chunks, and large enough that a 256 KiB image is four rows.
CHUNK_BYTES: Final = 64 * 1024
MAX_DISPLAY_NAME: Final = 200
_UPLOADS_AT_ONCE: Final = 4
_RETRY_UPLOAD_SECONDS: Final = 10


@dataclass(frozen=True)
class StoredKey:
    """A registered release key."""

    key: ReleaseKey
    display_name: str
    created_at: datetime


@dataclass(frozen=True)
class ArtifactView:
    """An artifact's metadata as callers see it."""

    sha256: str
    display_name: str
    version: str
    format: ArtifactFormat
    size: int
    compatible_kinds: tuple[str, ...]
    compatible_models: tuple[str, ...]
    minimum_from_version: str
    release_notes: str
    signing_key_id: str
    security_counter: int | None
    signature: bytes
    created_at: datetime
    uploaded_by: str


def _stored_key(row: ReleaseKeyRecord) -> StoredKey:
    return StoredKey(
        ReleaseKey(row.key_id, KeyAlgorithm(row.algorithm), bytes(row.public_key_der)),
        row.display_name,
        row.created_at,
    )


async def add_release_key(data: bytes, display_name: str) -> StoredKey:
    """Register a release key; AlreadyExists if it is registered."""
    if len(display_name) > MAX_DISPLAY_NAME:
        raise InvalidArgument(f"display_name is longer than {MAX_DISPLAY_NAME} characters")
    key = parse_public_key(data)
    try:
        row = await ReleaseKeyRecord.create(
            key_id=key.key_id,
            algorithm=key.algorithm.value,
            public_key_der=key.public_key_der,
            display_name=display_name,
            created_at=datetime.now(UTC),
        )
    except IntegrityError:
        raise AlreadyExists(f"release key {key.key_id} is registered already") from None
    return _stored_key(row)


async def list_release_keys(requested_size: int, token: str) -> tuple[list[StoredKey], str]:
    """A page of release keys in id order, and the next token."""
    size = page_size(requested_size)
    after = decode_page_token(token, "release-keys")
    rows = await ReleaseKeyRecord.filter(key_id__gt=after).order_by("key_id").limit(size + 1)
    page, next_token = split_page(rows, size, lambda r: r.key_id, "release-keys")
    return [_stored_key(r) for r in page], next_token


async def delete_release_key(key_id: str) -> None:
    """Remove a release key; NotFound if it is not registered."""
    if not await ReleaseKeyRecord.filter(key_id=key_id).delete():
        raise NotFound(f"release key {key_id} is not registered")


async def _release_keys() -> list[ReleaseKey]:
    return [_stored_key(r).key for r in await ReleaseKeyRecord.all()]


class Uploads:
    """Bounds the uploads gathered in memory at once."""

    def __init__(self, at_once: int = _UPLOADS_AT_ONCE) -> None:
        self._slots = asyncio.Semaphore(at_once)

    async def store(
        self,
        metadata: UploadMetadata,
        chunks: AsyncIterator[bytes],
        uploaded_by: str,
        max_size: int,
    ) -> ArtifactView:
        """Receive an image, check it and store it; an image stored already returns the
        stored artifact."""
        check_metadata(metadata, max_size)
        if self._slots.locked():
            raise ResourceExhausted(
                "too many firmware uploads are in progress", _RETRY_UPLOAD_SECONDS
            )
        async with self._slots:
            image = bytearray()
            async for chunk in chunks:
                if len(image) + len(chunk) > metadata.size:
                    raise InvalidArgument(
                        f"upload exceeds the announced size_bytes {metadata.size}"
                    )
                image += chunk
            accepted = accept_image(metadata, bytes(image), await _release_keys())
            return await _insert(metadata, accepted, bytes(image), uploaded_by)


async def _insert(
    metadata: UploadMetadata, accepted: AcceptedArtifact, image: bytes, uploaded_by: str
) -> ArtifactView:
    existing = await Artifact.get_or_none(sha256=accepted.sha256)
    if existing is not None:
        return _view(existing)
    try:
        async with in_transaction() as conn:
            row = await Artifact.create(
                using_db=conn,
                sha256=accepted.sha256,
                display_name=metadata.display_name,
                version=accepted.version,
                format=accepted.format.value,
                size=accepted.size,
                compatible_kinds=list(metadata.compatible_kinds),
                compatible_models=list(metadata.compatible_models),
                minimum_from_version=metadata.minimum_from_version,
                release_notes=metadata.release_notes,
                signing_key_id=accepted.signing_key_id,
                security_counter=accepted.security_counter,
                signature=metadata.signature,
                chunk_size=CHUNK_BYTES,
                created_at=datetime.now(UTC),
                uploaded_by=uploaded_by,
            )
            await ArtifactChunk.bulk_create(
                [
                    ArtifactChunk(artifact_id=accepted.sha256, index=n, data=image[start:end])
                    for n, (start, end) in enumerate(_chunk_bounds(len(image)))
                ],
                using_db=conn,
            )
    except IntegrityError:
        # The same image uploaded at the same moment by someone else: theirs won.
        return _view(await Artifact.get(sha256=accepted.sha256))
    return _view(row)


def _chunk_bounds(size: int) -> list[tuple[int, int]]:
    return [(start, min(size, start + CHUNK_BYTES)) for start in range(0, size, CHUNK_BYTES)]


def _view(row: Artifact) -> ArtifactView:
    return ArtifactView(
        sha256=row.sha256,
        display_name=row.display_name,
        version=row.version,
        format=ArtifactFormat(row.format),
        size=row.size,
        compatible_kinds=tuple(row.compatible_kinds),
        compatible_models=tuple(row.compatible_models),
        minimum_from_version=row.minimum_from_version,
        release_notes=row.release_notes,
        signing_key_id=row.signing_key_id,
        security_counter=row.security_counter,
        signature=bytes(row.signature),
        created_at=row.created_at,
        uploaded_by=row.uploaded_by,
    )


async def get_artifact(sha256: str) -> ArtifactView:
    """One artifact; NotFound if unknown."""
    row = await Artifact.get_or_none(sha256=sha256)
    if row is None:
        raise NotFound(f"artifact {sha256} does not exist")
    return _view(row)


async def list_artifacts(requested_size: int, token: str) -> tuple[list[ArtifactView], str]:
    """A page of artifacts, newest first, and the next token."""
    size = page_size(requested_size)
    after = decode_page_token(token, "artifacts")
    query = Artifact.all().order_by("-created_at", "-sha256")
    if after:
        created, _, sha = after.partition("/")
        at = datetime.fromisoformat(created)
        query = query.filter(created_at__lte=at).exclude(created_at=at, sha256__gte=sha)
    rows = await query.limit(size + 1)
    page, next_token = split_page(
        rows, size, lambda r: f"{r.created_at.isoformat()}/{r.sha256}", "artifacts"
    )
    return [_view(r) for r in page], next_token


async def delete_artifact(sha256: str) -> None:
    """Delete an artifact and its bytes; FailedPrecondition while a campaign refers to it."""
    async with in_transaction() as conn:
        row = await Artifact.filter(sha256=sha256).using_db(conn).select_for_update().first()
        if row is None:
            raise NotFound(f"artifact {sha256} does not exist")
        users = await Campaign.filter(artifact_id=sha256).using_db(conn).count()
        if users:
            raise FailedPrecondition(
                f"artifact {sha256} is used by {users} campaign(s); delete them first"
            )
        await ArtifactChunk.filter(artifact_id=sha256).using_db(conn).delete()
        await row.delete(using_db=conn)


async def read_chunk(sha256: str, index: int) -> bytes | None:
    """One stored chunk of an artifact, None past its end."""
    row = await ArtifactChunk.filter(artifact_id=sha256, index=index).first()
    return None if row is None else bytes(row.data)
