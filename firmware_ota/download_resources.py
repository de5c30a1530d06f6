"""The device-facing firmware resources on CoAP (over `coaps+tcp`, certificate required).

* `GET /fw/{sha256}`: the image, block-wise (RFC 7959 Block2), each block read from the one
  stored chunk that holds it, so no request loads a whole image and any block can be asked
  for first (a download resumes where it broke off). Only a device that holds a job for the
  image may read it (4.03 otherwise; 4.04 for an image that does not exist).
* `GET /fw/manifest-key`: the public key (PEM) the service signs SUIT manifests with.

aiocoap would assemble a whole response and cache it per client to serve blocks; these
resources answer blocks themselves instead (`needs_blockwise_assembly` is False).
"""

from __future__ import annotations

import re
import time
from collections import OrderedDict
from typing import Final

import aiocoap
import aiocoap.resource
from aiocoap.numbers import ContentFormat
from aiocoap.numbers.codes import Code
from aiocoap.optiontypes import BlockOption

from firmware_ota.artifact_store import CHUNK_BYTES, get_artifact, read_chunk
from firmware_ota.campaign_store import assigned_to
from twin.coap_resources import BoundedResource
from twin.device_resources import DeviceSide
from twin.errors import InvalidArgument, NotFound, PermissionDenied

MANIFEST_KEY: Final = "manifest-key"
# Largest block a request may ask for: szx 6 (1024 bytes); BERT (szx 7) is answered in
# 1024-byte blocks too.
_MAX_SZX: Final = 6
_SHA256_HEX: Final = re.compile(r"[0-9a-f]{64}")
# Chunks kept in memory: a fleet downloads the same few images, so a handful of 64 KiB
# chunks serves thousands of devices without touching the database for every block.
_CACHED_CHUNKS: Final = 64
# How long a device's permission to read an image is remembered (not re-checked per block).
_ASSIGNMENT_TTL_SECONDS: Final = 10.0
_MAX_ASSIGNMENTS: Final = 50_000


class FirmwareImages(BoundedResource, aiocoap.resource.PathCapable):  # type: ignore[misc]
    """`/fw/...`: images by digest, and the manifest key."""

    def __init__(self, side: DeviceSide, manifest_key_pem: bytes) -> None:
        super().__init__(max_body_bytes=0)
        self._side = side
        self._manifest_key_pem = manifest_key_pem
        self._chunks: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self._assigned: OrderedDict[tuple[str, str], float] = OrderedDict()
        self._sizes: dict[str, int] = {}

    async def needs_blockwise_assembly(self, request: aiocoap.Message) -> bool:
        return False

    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        identity = await self._side.device(request)
        path = request.opt.uri_path
        if path == (MANIFEST_KEY,):
            return aiocoap.Message(
                code=Code.CONTENT,
                payload=self._manifest_key_pem,
                content_format=ContentFormat.TEXT,
            )
        if len(path) != 1 or not _SHA256_HEX.fullmatch(path[0]):
            raise NotFound("firmware images are at /fw/{sha256} (64 lowercase hex digits)")
        sha256 = path[0]
        size = await self._size(sha256)
        await self._check_assigned(identity.device_id, sha256)
        block = request.opt.block2
        szx = _MAX_SZX if block is None else min(block.size_exponent, _MAX_SZX)
        block_size = 2 ** (szx + 4)
        number = 0 if block is None else block.block_number
        offset = number * block_size
        if offset >= size and not (offset == 0 and size == 0):
            raise InvalidArgument(f"block {number} lies past the end of the {size}-byte image")
        chunk = await self._chunk(sha256, offset // CHUNK_BYTES)
        start = offset % CHUNK_BYTES
        payload = chunk[start : start + block_size]
        more = offset + len(payload) < size
        response = aiocoap.Message(
            code=Code.CONTENT, payload=payload, content_format=ContentFormat.OCTETSTREAM
        )
        response.opt.block2 = BlockOption.BlockwiseTuple(number, more, szx)
        response.opt.size2 = size
        # The digest is the image: an ETag lets a device check it resumes the same image.
        response.opt.etag = bytes.fromhex(sha256)[:8]
        return response

    async def _size(self, sha256: str) -> int:
        if sha256 not in self._sizes:
            self._sizes[sha256] = (await get_artifact(sha256)).size
        return self._sizes[sha256]

    async def _check_assigned(self, device_id: str, sha256: str) -> None:
        key = (device_id, sha256)
        now = time.monotonic()
        checked = self._assigned.get(key)
        if checked is not None and now - checked < _ASSIGNMENT_TTL_SECONDS:
            return
        if not await assigned_to(device_id, sha256):
            self._assigned.pop(key, None)
            raise PermissionDenied(f"device {device_id} has no job for firmware {sha256}")
        self._assigned[key] = now
        self._assigned.move_to_end(key)
        while len(self._assigned) > _MAX_ASSIGNMENTS:
            self._assigned.popitem(last=False)

    async def _chunk(self, sha256: str, index: int) -> bytes:
        key = (sha256, index)
        cached = self._chunks.get(key)
        if cached is not None:
            self._chunks.move_to_end(key)
            return cached
        data = await read_chunk(sha256, index)
        if data is None:
            raise NotFound(f"firmware {sha256} has no chunk {index}")
        self._chunks[key] = data
        while len(self._chunks) > _CACHED_CHUNKS:
            self._chunks.popitem(last=False)
        return data


def add_firmware_resources(
    site: aiocoap.resource.Site, side: DeviceSide, manifest_key_pem: bytes
) -> None:
    """Add `/fw/...` to the device CoAP site."""
    site.add_resource(["fw"], FirmwareImages(side, manifest_key_pem))
