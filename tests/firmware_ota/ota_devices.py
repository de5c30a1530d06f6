"""Test devices that follow firmware jobs over real CoAP (coaps+tcp with their certificates),
with scripted misbehaviour, and helpers to sign and upload firmware through the real API."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiocoap
import cbor2
from aiocoap.numbers.codes import Code
from aiocoap.optiontypes import BlockOption
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from google.protobuf.field_mask_pb2 import FieldMask

from citytwin.v1 import devices_pb2 as d
from citytwin.v1 import firmware_pb2 as f
from firmware_ota.suit_manifests import read_envelope
from tests.coap_devices import Site, coap_client, enrolled_device
from tests.conftest import Api
from tests.firmware_ota.signing_fixtures import imgtool_key, imgtool_sign

CBOR = 60
BLOCK_SZX = 6


@dataclass
class Misbehaviour:
    """What a test device does wrong: report a failure with `fail_reason` after downloading,
    come back on its old version after installing (`revert`), or never answer (`silent`)."""

    fail_reason: str = ""
    revert: bool = False
    silent: bool = False


@dataclass
class OtaDevice:
    """One enrolled device running `version`, following its desired firmware job."""

    site: Site
    device_id: str
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    version: str
    misbehaviour: Misbehaviour = field(default_factory=Misbehaviour)
    blocks_fetched: list[int] = field(default_factory=list)
    jobs_done: list[tuple[str, int]] = field(default_factory=list)
    # Set once the device has reported its version and observes its desired state.
    ready: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self, stop: asyncio.Event) -> None:
        """Report the running version, then follow desired state until `stop`."""
        self.ready.clear()
        async with coap_client(self.site.trust, self.cert, self.key) as context:
            await self.report(context, {"firmware": {"version": self.version, "state": "idle"}})
            observed = context.request(
                aiocoap.Message(
                    code=aiocoap.GET, uri=self.site.coaps + "/twin/desired", observe=0, accept=CBOR
                )
            )
            first = await asyncio.wait_for(observed.response, 15)
            self.ready.set()
            queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
            queue.put_nowait(cbor2.loads(first.payload))

            async def notifications() -> None:
                async for note in observed.observation:
                    queue.put_nowait(cbor2.loads(note.payload))

            listener = asyncio.create_task(notifications())
            stopping = asyncio.create_task(stop.wait())
            try:
                while not stop.is_set():
                    getting = asyncio.create_task(queue.get())
                    await asyncio.wait({getting, stopping}, return_when=asyncio.FIRST_COMPLETED)
                    if not getting.done():
                        getting.cancel()
                        break
                    await self.follow(context, getting.result())
            finally:
                listener.cancel()
                stopping.cancel()
                observed.observation.cancel()

    async def follow(self, context: aiocoap.Context, desired: dict[str, Any]) -> None:
        """Act on a desired document's firmware job, if it names one not done yet."""
        job = desired.get("firmware") or {}
        sha, attempt = job.get("sha256"), job.get("attempt")
        instruction = (sha, attempt, job.get("action"))
        if not sha or instruction in self.jobs_done or self.misbehaviour.silent:
            return
        await self.perform(context, job)
        # Recorded once carried out: a device cut off half-way does it again on reconnecting.
        self.jobs_done.append(instruction)

    async def perform(self, context: aiocoap.Context, job: dict[str, Any]) -> None:
        """Download, check and (if told to) install the job's image, reporting each step."""
        sha = job["sha256"]
        await self.report(context, {"firmware": {"job": sha, "state": "downloading"}})
        # The manifest, signed by the service, vouches for what the job says.
        key = await self.fetch(context, "/fw/manifest-key")
        manifest = read_envelope(base64.b64decode(job["manifest"]), load_pem_public_key(key))
        assert (manifest.image_sha256.hex(), manifest.image_size) == (sha, job["size"])
        assert manifest.uri == job["uri"]
        image = await self.download(context, job["uri"])
        if hashlib.sha256(image).hexdigest() != sha:
            await self.failed(context, sha, "integrity")
            return
        if self.misbehaviour.fail_reason:
            await self.failed(context, sha, self.misbehaviour.fail_reason)
            return
        await self.report(context, {"firmware": {"state": "downloaded", "progress": 100}})
        if job["action"] != "install":
            return
        await self.report(context, {"firmware": {"state": "updating"}})
        if not self.misbehaviour.revert:
            self.version = job["version"]
        await self.report(
            context,
            {"firmware": {"version": self.version, "state": "idle", "result": "success"}},
        )

    async def failed(self, context: aiocoap.Context, sha: str, reason: str) -> None:
        await self.report(
            context,
            {"firmware": {"job": sha, "state": "idle", "result": "failed", "reason": reason}},
        )

    async def fetch(self, context: aiocoap.Context, path: str) -> bytes:
        """A plain GET on the device's connection."""
        message = aiocoap.Message(code=aiocoap.GET, uri=self.site.coaps + path)
        response = await asyncio.wait_for(context.request(message).response, 15)
        assert response.code == Code.CONTENT, response.payload
        payload: bytes = response.payload
        return payload

    async def download(self, context: aiocoap.Context, path: str, first_block: int = 0) -> bytes:
        """Fetch an image block by block from `first_block` on."""
        image = bytearray()
        number = first_block
        while True:
            message = aiocoap.Message(code=aiocoap.GET, uri=self.site.coaps + path)
            message.opt.block2 = BlockOption.BlockwiseTuple(number, False, BLOCK_SZX)
            response = await asyncio.wait_for(
                context.request(message, handle_blockwise=False).response, 15
            )
            assert response.code == Code.CONTENT, response.payload
            self.blocks_fetched.append(number)
            image += response.payload
            if not response.opt.block2.more:
                return bytes(image)
            number += 1

    async def report(self, context: aiocoap.Context, patch: dict[str, Any]) -> None:
        message = aiocoap.Message(
            code=aiocoap.POST,
            uri=self.site.coaps + "/twin/reported",
            payload=cbor2.dumps(patch),
            content_format=CBOR,
        )
        response = await asyncio.wait_for(context.request(message).response, 15)
        assert response.code == Code.CHANGED, response.payload


async def ota_devices(
    site: Site, count: int, version: str = "1.0.0", misbehaviour: Misbehaviour | None = None
) -> list[OtaDevice]:
    """`count` lamps enrolled over coaps+tcp, running `version`."""
    devices = []
    for _ in range(count):
        device_id, cert, key = await enrolled_device(site)
        devices.append(
            OtaDevice(site, device_id, cert, key, version, misbehaviour or Misbehaviour())
        )
    return devices


@contextlib.asynccontextmanager
async def running(devices: list[OtaDevice], ready_within: float = 60.0) -> Any:
    """Run devices for the duration of the block, which starts once every device has reported
    its version and observes its desired state."""
    stop = asyncio.Event()
    tasks = [asyncio.create_task(d.run(stop)) for d in devices]
    try:
        deadline = asyncio.get_running_loop().time() + ready_within
        while not all(d.ready.is_set() for d in devices):
            for task in tasks:
                if task.done():
                    task.result()  # a device that failed to start raises here
                    raise AssertionError("a device stopped before it was ready")
            assert asyncio.get_running_loop().time() < deadline, "devices not ready in time"
            await asyncio.sleep(0.02)
        yield devices
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)


@dataclass
class Release:
    """A release key registered with the service, and images signed with it."""

    api: Api
    directory: Path
    key_type: str = "ed25519"

    def __post_init__(self) -> None:
        self.key = imgtool_key(self.directory, self.key_type)
        self.api.call(
            self.api.firmware.CreateReleaseKey,
            f.CreateReleaseKeyRequest(public_key=self.key.pem_path.read_bytes(), display_name="t"),
        )

    def mcuboot(self, version: str, size: int = 20_000, *options: str) -> bytes:
        """An imgtool-signed MCUboot image of a random body."""
        return imgtool_sign(
            self.directory, os.urandom(size), *options, key=self.key.pem_path, version=version
        )


def label(api: Api, device_id: str, labels: dict[str, str]) -> None:
    """Set a device's labels, as an installer would after enrolling it."""
    api.call(
        api.devices.UpdateDevice,
        d.UpdateDeviceRequest(
            device=d.Device(name=f"devices/{device_id}", labels=labels),
            update_mask=FieldMask(paths=["labels"]),
        ),
    )


def upload(api: Api, image: bytes, **metadata: Any) -> f.Artifact:
    """Upload through the client stream in 16 KiB chunks."""
    metadata.setdefault("display_name", "lamp-controller")
    metadata.setdefault("size_bytes", len(image))

    def parts() -> Iterator[f.UploadArtifactRequest]:
        yield f.UploadArtifactRequest(metadata=f.ArtifactMetadata(**metadata))
        for start in range(0, len(image), 16384):
            yield f.UploadArtifactRequest(chunk=image[start : start + 16384])

    artifact: f.Artifact = api.call(api.firmware.UploadArtifact, parts())
    return artifact
