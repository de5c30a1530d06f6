"""Benchmark: a firmware campaign over 1,000 simulated lamps, from StartCampaign to COMPLETED,
and the rate at which citytwin serves the image block-wise, against a bare aiocoap server
serving the same image to as many clients (the upper bound), measured in the same run.

    .venv/bin/python bench/ota.py [--devices 1000] [--image-kib 256] [--backend sqlite|postgres]
                                  [--pg DSN] [--bare-clients N] [--reboot-seconds S]

The image is a real MCUboot image: a random body of `--image-kib` KiB less the 0x200-byte
header, signed by `imgtool sign` (the venv's) with a key from `imgtool keygen`, version 2.1.0;
the simulated lamps run 2.0.3. The server is a `citytwin serve` process on 127.0.0.1, on
SQLite (or PostgreSQL with `--backend postgres`: a database is created from `--pg`, default
CITYTWIN_BENCH_PG or CITYTWIN_TEST_PG), with a campaign pass every 0.2 s
(CITYTWIN_CAMPAIGN_PASS). The devices are the simulator's (twin/simulator: `Fleet`,
`SimulatedDevice`, as `citytwin simulate` runs them) in this process on one core, each with its
own certificate and `coaps+tcp` connection. Untimed: the release key is registered through
gRPC, the image uploaded (UploadArtifact, 64 KiB chunks), the lamps registered and enrolled
(EST-coaps), and each connected, observing `/twin/desired` and having reported its state.

Timed: one campaign over every lamp, waves 1%, 10%, 50%, 100% (success threshold 0.95, failure
threshold 0.10: the defaults, which pass as no device is made to fail), no rate limits. Each
lamp follows its job as the simulator has it: fetches the manifest key, downloads the image in
1024-byte blocks (one Block2 request at a time), checks it, reports progress every quarter,
installs, reboots (`--reboot-seconds`, the simulator's default 2 s), reconnects and reports the
new version. The campaign is polled with GetCampaign every 0.25 s (WatchCampaign would re-read
the campaign on every device report, adding server work of its own). Figures:

* time to complete: from the StartCampaign call to the first GetCampaign saying COMPLETED,
  and devices/s = succeeded devices / that time;
* firmware MiB/s served: the bytes of every block the devices received / the download phase,
  from the first block to the last (sampled every 10 ms). The waves make this phase
  include stretches where few devices download (a wave starts once 95% of the previous one
  have rebooted into the new image), so it is below what the server can serve flat out;
  the row under it is the best rate over any 10 s, when a large wave downloads at once.

Under the table: the CPU time the server and this process (the devices, or the bare clients)
used per MiB while timed, to tell whether a side is bound by the server or by the devices.

The bare server is aiocoap alone: a Site with one plain `Resource` whose GET returns the whole
image, aiocoap cutting it into Block2 blocks (rendering on block 0, later blocks from its
per-connection Block2 cache), over coaps+tcp behind the same `start_tls_server` transport and
TLS settings as citytwin (bench/devices.py, with a CA of the bench's own). `--bare-clients`
clients (default: `--devices`), each its own TLS connection opened beforehand (untimed), all
download the image at once with the simulator's own block loop (`download_image`, 1024-byte
blocks) and check its digest; MiB/s = all bytes / from the start to the last client done.
The ratio citytwin / bare says how much of a bare CoAP block server's rate survives the
campaign (device checks, the job's permission, stored chunks, progress reports, waves).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiocoap
import aiocoap.resource
import grpc
from aiocoap.numbers import ContentFormat
from aiocoap.numbers.codes import Code

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.devices import (
    REQUEST_TIMEOUT_SECONDS,
    BareServer,
    LocalPki,
    bounded,
    close_devices,
    connect_devices,
    process_cpu_seconds,
    raise_fd_limit,
    serve_bare,
)
from citytwin.v1 import firmware_pb2 as f
from citytwin.v1 import firmware_pb2_grpc
from tests.conftest import Server, new_database, run_cli
from twin.simulator.devices import (
    DEFAULT_REBOOT_SECONDS,
    FIRMWARE,
    Behaviour,
    Endpoint,
    Kind,
    download_image,
)
from twin.simulator.fleet import RUN_LABEL, Fleet, FleetPlan, GrpcInstaller

# The version the image is signed as; the lamps run FIRMWARE[Kind.LAMP] (2.0.3) before.
_NEW_VERSION = "2.1.0"
_HEADER_SIZE = 0x200
_UPLOAD_CHUNK = 64 * 1024
# The slot holds the image, its TLVs and MCUboot's trailer: this much room beyond the image.
_SLOT_MARGIN = 0x10000
_SLOT_ALIGN = 0x1000
# Same as bench/enroll.py: beyond this many enrollments in flight the server only queues them.
_ENROLL_CONCURRENCY = 16
# Bare clients opening their TLS connections at once (untimed).
_CONNECT_CONCURRENCY = 64
_CAMPAIGN_PASS_SECONDS = "0.2"
_POLL_SECONDS = 0.25
_SAMPLE_SECONDS = 0.01
# Other processes using more than this share of the machine make a measurement doubtful.
_DISTURBED_SHARE = 0.05
_DISTURBED = ": DISTURBED, run again on a quiet machine"
# The window of the peak rate.
_PEAK_WINDOW_SECONDS = 10.0
# A report interval far beyond any run: the lamps only speak about firmware while measured.
_QUIET_INTERVAL_SECONDS = 3600.0
# Each attempt's limit: a device that takes longer counts as timed out (the bench then fails).
_DEVICE_TIMEOUT_SECONDS = 600
# Limits on the untimed set-up and on the campaign: the bench fails rather than hang.
_SETUP_LIMIT_SECONDS = 900.0
_CAMPAIGN_LIMIT_SECONDS = 900.0
_CALL_TIMEOUT_SECONDS = 120.0


@dataclass(frozen=True)
class SignedImage:
    """An imgtool-signed MCUboot image and the imgtool key file (PEM) it is signed with."""

    data: bytes
    key_pem: bytes

    @property
    def sha256(self) -> str:
        """Lowercase hex digest, the artifact's identity."""
        return hashlib.sha256(self.data).hexdigest()


@dataclass(frozen=True)
class Served:
    """What one side delivered: bytes, over how long, with how much server CPU."""

    downloads: int
    total_bytes: int
    seconds: float
    cpu: CpuUse
    peak_mib_per_second: float | None

    @property
    def mib_per_second(self) -> float:
        """Firmware MiB per second."""
        return self.total_bytes / 2**20 / self.seconds

    def per_mib(self, seconds: float | None) -> str:
        """CPU milliseconds per MiB served, for people."""
        if seconds is None:
            return "n/a"
        return f"{seconds * 1000 / (self.total_bytes / 2**20):.0f} ms"


@dataclass(frozen=True)
class CampaignResult:
    """The campaign's outcome and what the devices received meanwhile."""

    seconds: float
    targeted: int
    succeeded: int
    served: Served
    waves: str
    problems: list[str]


@dataclass(frozen=True)
class CpuUse:
    """CPU seconds used while timed by the server, by this process (the devices or the bare
    clients) and by every other process on the machine (which disturbs the figures)."""

    server: float | None
    devices: float | None
    others: float | None


class CpuMeter:
    """Measures CPU use from its creation on (Linux /proc; None elsewhere)."""

    def __init__(self, server_pid: int) -> None:
        self.server_pid = server_pid
        self._start = self._read()

    def _read(self) -> tuple[float | None, float | None, float | None]:
        return (
            process_cpu_seconds(self.server_pid),
            process_cpu_seconds(os.getpid()),
            _machine_busy_seconds(),
        )

    def used(self) -> CpuUse:
        """CPU seconds used since creation."""
        now = self._read()
        server, devices, machine = (
            None if b is None or a is None else b - a for a, b in zip(self._start, now, strict=True)
        )
        others = None
        if server is not None and devices is not None and machine is not None:
            others = max(0.0, machine - server - devices)
        return CpuUse(server, devices, others)


def _machine_busy_seconds() -> float | None:
    """CPU seconds all processors have spent busy since boot (/proc/stat: user, nice,
    system, irq, softirq, steal)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def imgtool(*args: str) -> None:
    """Run the venv's imgtool (the console script beside this interpreter)."""
    command = [str(Path(sys.executable).with_name("imgtool")), *args]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"imgtool {args[0]} failed: {done.stderr.strip() or done.stdout.strip()}")


def signed_image(directory: Path, image_kib: int) -> SignedImage:
    """A new ed25519 key and an MCUboot image of `image_kib` KiB (header and body; the TLVs
    come on top) of random bytes, signed with it as version _NEW_VERSION."""
    key = directory / "release-key.pem"
    imgtool("keygen", "-k", str(key), "-t", "ed25519")
    body = directory / "body.bin"
    body.write_bytes(os.urandom(max(1, image_kib * 1024 - _HEADER_SIZE)))
    slot = -(-(image_kib * 1024 + _SLOT_MARGIN) // _SLOT_ALIGN) * _SLOT_ALIGN
    image = directory / "image.bin"
    imgtool(
        "sign",
        "--header-size",
        hex(_HEADER_SIZE),
        "--pad-header",
        "--align",
        "4",
        "--slot-size",
        hex(slot),
        "--version",
        _NEW_VERSION,
        "-k",
        str(key),
        str(body),
        str(image),
    )
    return SignedImage(image.read_bytes(), key.read_bytes())


class ByteClock:
    """Samples a count of received firmware bytes every _SAMPLE_SECONDS: when the first and
    the last bytes arrived, and the best rate over any _PEAK_WINDOW_SECONDS."""

    def __init__(self, count: Callable[[], int]) -> None:
        self.count = count
        self.first: float | None = None
        self.last: float | None = None
        # (time, count) at every sample that saw the count change.
        self.samples: list[tuple[float, int]] = []
        self._seen = count()

    async def run(self) -> None:
        """Sample until cancelled."""
        while True:
            await asyncio.sleep(_SAMPLE_SECONDS)
            self.sample()

    def sample(self) -> None:
        """Note the time if more bytes have arrived since the last sample."""
        now = self.count()
        if now != self._seen:
            at = time.perf_counter()
            if self.first is None:
                # The bytes came in since the previous sample, not at this one.
                self.samples.append((at - _SAMPLE_SECONDS, self._seen))
                self.first = at - _SAMPLE_SECONDS
            self.last = at
            self._seen = now
            self.samples.append((at, now))

    def peak_mib_per_second(self) -> float | None:
        """The highest rate over any _PEAK_WINDOW_SECONDS (None for a shorter download)."""
        best: float | None = None
        end = 0
        for start_at, start_count in self.samples:
            while (
                end < len(self.samples) and self.samples[end][0] - start_at < _PEAK_WINDOW_SECONDS
            ):
                end += 1
            if end == len(self.samples):
                break
            at, count = self.samples[end]
            rate = (count - start_count) / 2**20 / (at - start_at)
            best = rate if best is None else max(best, rate)
        return best


# --- the bare server ----------------------------------------------------------------------


class BareImage(aiocoap.resource.Resource):  # type: ignore[misc]
    """The whole image on every GET; aiocoap serves it block-wise (Block2) by itself."""

    def __init__(self, image: bytes) -> None:
        super().__init__()
        self.image = image

    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        """The image, whole."""
        return aiocoap.Message(
            code=Code.CONTENT, payload=self.image, content_format=ContentFormat.OCTETSTREAM
        )


class Hello(aiocoap.resource.Resource):  # type: ignore[misc]
    """A tiny answer, with which a client opens its connection before the timed part."""

    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        """Nothing much."""
        return aiocoap.Message(code=Code.CONTENT, payload=b"hello")


def bare_site(image: bytes) -> aiocoap.resource.Site:
    """The bare server's site: `/fw/image` and `/hello`."""
    site = aiocoap.resource.Site()
    site.add_resource(["fw", "image"], BareImage(image))
    site.add_resource(["hello"], Hello())
    return site


async def bare_downloads(
    coaps: str, pki: LocalPki, clients: int, image: bytes, server_pid: int
) -> Served:
    """Connect `clients` clients (untimed), then have all download the image at once."""
    devices = pki.devices(clients)
    contexts = await connect_devices(pki.trust_pem, devices)
    digest = hashlib.sha256(image).digest()
    try:

        def hello(context: aiocoap.Context) -> Callable[[], Awaitable[None]]:
            async def call() -> None:
                message = aiocoap.Message(code=aiocoap.GET, uri=f"{coaps}/hello")
                response = await asyncio.wait_for(
                    context.request(message).response, REQUEST_TIMEOUT_SECONDS
                )
                if response.code != Code.CONTENT:
                    raise RuntimeError(f"/hello answered {response.code}")

            return call

        started = time.perf_counter()
        await bounded(_CONNECT_CONCURRENCY, [hello(c) for c in contexts])
        print(
            f"  ({clients} bare clients connected in {time.perf_counter() - started:.1f} s)",
            flush=True,
        )
        gc.collect()
        gc.freeze()

        received_bytes = 0

        async def count(length: int) -> None:
            nonlocal received_bytes
            received_bytes += length

        async def download(context: aiocoap.Context) -> float:
            received = bytearray()
            await download_image(
                context, f"{coaps}/fw/image", received, limit=len(image), after_block=count
            )
            if hashlib.sha256(received).digest() != digest:
                raise RuntimeError("a bare download arrived corrupted")
            return time.perf_counter()

        clock = ByteClock(lambda: received_bytes)
        sampler = asyncio.create_task(clock.run())
        meter = CpuMeter(server_pid)
        started = time.perf_counter()
        try:
            ends = await asyncio.gather(*(download(c) for c in contexts))
        finally:
            sampler.cancel()
        seconds = max(ends) - started
        cpu = meter.used()
        clock.sample()
        return Served(
            clients,
            received_bytes,
            seconds,
            cpu,
            clock.peak_mib_per_second(),
        )
    finally:
        gc.unfreeze()
        await close_devices(contexts)


def run_bare(args: argparse.Namespace, image: bytes) -> Served:
    """The upper bound: a bare aiocoap block-wise server, `--bare-clients` downloading."""
    pki = LocalPki.create()
    with tempfile.TemporaryDirectory() as directory:
        pki.save(Path(directory))
        image_path = Path(directory) / "image.bin"
        image_path.write_bytes(image)
        server = BareServer(
            __file__, "citytwin", Path(directory), 0, extra=["--image", str(image_path)]
        )
        try:
            coaps = f"coaps+tcp://127.0.0.1:{server.port}"
            return asyncio.run(bare_downloads(coaps, pki, args.bare_clients, image, server.pid))
        finally:
            server.stop()


# --- citytwin -----------------------------------------------------------------------------


async def _set_up_release(
    channel: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...], image: SignedImage
) -> f.Artifact:
    """Register the release key and upload the image; the stored artifact."""
    firmware = firmware_pb2_grpc.FirmwareServiceStub(channel)
    await firmware.CreateReleaseKey(
        f.CreateReleaseKeyRequest(public_key=image.key_pem, display_name="bench releases"),
        metadata=metadata,
        timeout=_CALL_TIMEOUT_SECONDS,
    )

    async def parts() -> AsyncIterator[f.UploadArtifactRequest]:
        yield f.UploadArtifactRequest(
            metadata=f.ArtifactMetadata(
                display_name="lamp-controller",
                size_bytes=len(image.data),
                sha256=image.sha256,
                compatible_kinds=["lamp"],
            )
        )
        for start in range(0, len(image.data), _UPLOAD_CHUNK):
            yield f.UploadArtifactRequest(chunk=image.data[start : start + _UPLOAD_CHUNK])

    artifact: f.Artifact = await firmware.UploadArtifact(
        parts(), metadata=metadata, timeout=_CALL_TIMEOUT_SECONDS
    )
    if artifact.sha256 != image.sha256:
        raise RuntimeError(f"uploaded {image.sha256}, stored {artifact.sha256}")
    return artifact


async def _until(condition: Callable[[], bool], runner: asyncio.Task[None], what: str) -> None:
    """Wait until `condition()`; fails if the fleet ends first or it takes too long."""
    deadline = time.monotonic() + _SETUP_LIMIT_SECONDS
    while not condition():
        if runner.done():
            await runner
            raise RuntimeError(f"the fleet ended before {what}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"not {what} after {_SETUP_LIMIT_SECONDS:.0f} s")
        await asyncio.sleep(0.1)


async def _campaign(
    server: Server, token: str, trust: bytes, image: SignedImage, args: argparse.Namespace
) -> CampaignResult:
    metadata = (("authorization", f"Bearer {token}"),)
    async with grpc.aio.insecure_channel(server.address) as channel:
        artifact = await _set_up_release(channel, metadata, image)
        campaigns = firmware_pb2_grpc.CampaignServiceStub(channel)
        plan = FleetPlan(lamps=args.devices, enroll_concurrency=_ENROLL_CONCURRENCY)
        behaviour = Behaviour(interval=_QUIET_INTERVAL_SECONDS, reboot_seconds=args.reboot_seconds)
        async with GrpcInstaller(server.address, token) as installer:
            fleet = Fleet(
                plan, behaviour, Endpoint("127.0.0.1", server.coaps_port, trust), installer
            )
            stop = asyncio.Event()
            started = time.perf_counter()
            runner = asyncio.create_task(fleet.run(stop))
            clock = ByteClock(lambda: fleet.counters.firmware_bytes)
            sampler: asyncio.Task[None] | None = None
            try:
                counters = fleet.counters
                # Every lamp connected, observing, and its first report (version 2.0.3) in.
                await _until(
                    lambda: (
                        counters.connected >= args.devices and counters.reports_ok >= args.devices
                    ),
                    runner,
                    "every device connected and reporting",
                )
                print(
                    f"  ({args.devices} lamps enrolled, connected, observing and reported in"
                    f" {time.perf_counter() - started:.1f} s)",
                    flush=True,
                )
                if counters.enroll_failed or fleet.problems:
                    raise RuntimeError(f"set-up problems: {fleet.problems}")
                gc.collect()
                gc.freeze()
                created = await campaigns.CreateCampaign(
                    f.CreateCampaignRequest(
                        campaign=f.Campaign(
                            display_name="bench",
                            artifact=artifact.name,
                            target_filter=f"kind=lamp,{RUN_LABEL}={plan.run_id}",
                            waves=[
                                f.Wave(
                                    percent=percent,
                                    success_threshold=0.95,
                                    failure_threshold=0.10,
                                    on_failure=f.FAILURE_ACTION_PAUSE,
                                )
                                for percent in (1, 10, 50, 100)
                            ],
                            rate_limits=f.RateLimits(),
                            device_timeout_seconds=_DEVICE_TIMEOUT_SECONDS,
                        )
                    ),
                    metadata=metadata,
                    timeout=_CALL_TIMEOUT_SECONDS,
                )
                sampler = asyncio.create_task(clock.run())
                assert server.process is not None
                meter = CpuMeter(server.process.pid)
                began = time.perf_counter()
                await campaigns.StartCampaign(
                    f.CampaignActionRequest(name=created.name, reason="bench"),
                    metadata=metadata,
                    timeout=_CALL_TIMEOUT_SECONDS,
                )
                deadline = began + _CAMPAIGN_LIMIT_SECONDS
                while True:
                    current = await campaigns.GetCampaign(
                        f.GetCampaignRequest(name=created.name),
                        metadata=metadata,
                        timeout=_CALL_TIMEOUT_SECONDS,
                    )
                    if current.state == f.CAMPAIGN_STATE_COMPLETED:
                        break
                    if current.state != f.CAMPAIGN_STATE_RUNNING:
                        raise RuntimeError(
                            f"campaign {f.CampaignState.Name(current.state)}:"
                            f" {current.state_reason}; problems: {fleet.problems}"
                        )
                    if time.perf_counter() > deadline:
                        raise RuntimeError(
                            f"campaign not done after {_CAMPAIGN_LIMIT_SECONDS:.0f} s:"
                            f" {current.counts}"
                        )
                    await asyncio.sleep(_POLL_SECONDS)
                seconds = time.perf_counter() - began
                cpu = meter.used()
                clock.sample()
            finally:
                if sampler is not None:
                    sampler.cancel()
                gc.unfreeze()
                stop.set()
                await runner
    if clock.first is None or clock.last is None or clock.last <= clock.first:
        raise RuntimeError("no firmware bytes were downloaded")
    served = Served(
        fleet.counters.firmware_downloads,
        fleet.counters.firmware_bytes,
        clock.last - clock.first,
        cpu,
        clock.peak_mib_per_second(),
    )
    waves = ", ".join(
        f"{w.target_count} {w.status} ({w.counts.succeeded} ok)" for w in current.wave_status
    )
    return CampaignResult(
        seconds,
        current.counts.total,
        current.counts.succeeded,
        served,
        waves,
        list(fleet.problems),
    )


def run_citytwin(backend: str, args: argparse.Namespace, image: SignedImage) -> CampaignResult:
    """Start a citytwin server on `backend`, set up the release and the lamps, run the
    campaign."""
    with tempfile.TemporaryDirectory() as home:
        db = new_database(backend, Path(home))
        try:
            token = run_cli(db, "token", "create", "--role", "admin").stdout.strip()
            server = Server(
                db,
                extra_env={
                    "CITYTWIN_CAMPAIGN_PASS": _CAMPAIGN_PASS_SECONDS,
                    # Longer than any bench: a quiet observer must not be closed as idle.
                    "CITYTWIN_COAPS_IDLE_TIMEOUT": "3600",
                },
            ).start()
            try:
                trust = run_cli(db, "ca", "show", "--pem").stdout.encode()
                return asyncio.run(_campaign(server, token, trust, image, args))
            finally:
                server.stop()
        finally:
            db.drop()


def _seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def print_table(backend: str, image: SignedImage, campaign: CampaignResult, bare: Served) -> None:
    """The comparison, one row per figure."""
    ours = campaign.served
    rows = [
        ("", f"citytwin ({backend})", "bare aiocoap"),
        ("devices / downloads", f"{campaign.succeeded}/{campaign.targeted} succeeded",
         f"{bare.downloads} downloads"),
        ("campaign time to COMPLETED", f"{campaign.seconds:.1f} s", "-"),
        ("devices/s (succeeded / time)", f"{campaign.succeeded / campaign.seconds:.1f}",
         f"{bare.downloads / bare.seconds:.1f} downloads/s"),
        ("download phase (first to last block)", f"{ours.seconds:.1f} s", f"{bare.seconds:.1f} s"),
        ("firmware bytes received", f"{ours.total_bytes:,}", f"{bare.total_bytes:,}"),
        ("firmware MiB/s served", f"{ours.mib_per_second:.2f}", f"{bare.mib_per_second:.2f}"),
        (f"  best {_PEAK_WINDOW_SECONDS:.0f} s window, MiB/s", _rate(ours.peak_mib_per_second),
         _rate(bare.peak_mib_per_second)),
        ("server CPU per MiB", ours.per_mib(ours.cpu.server), bare.per_mib(bare.cpu.server)),
        ("devices' CPU per MiB (this process)", ours.per_mib(ours.cpu.devices),
         bare.per_mib(bare.cpu.devices)),
    ]  # fmt: skip
    print(flush=True)
    for label, left, right in rows:
        print(f"{label:<38} {left:>24} {right:>20}", flush=True)
    ratio = ours.mib_per_second / bare.mib_per_second
    print(f"{'ratio citytwin / bare (MiB/s)':<38} {ratio:>24.2f}", flush=True)
    print(f"waves: {campaign.waves}", flush=True)
    print(
        f"image {len(image.data):,} bytes ({-(-len(image.data) // 1024)} blocks of 1024);"
        f" CPU seconds while timed: citytwin server {_seconds(ours.cpu.server)}"
        f" (downloads, reports, driver), devices {_seconds(ours.cpu.devices)};"
        f" bare server {_seconds(bare.cpu.server)}, clients {_seconds(bare.cpu.devices)}",
        flush=True,
    )
    for label, served in (("citytwin", ours), ("bare", bare)):
        others = served.cpu.others
        if others is None:
            continue
        share = others / (served.seconds * (os.cpu_count() or 1))
        print(
            f"other processes used {others:.1f} CPU seconds during the {label} measurement"
            f" ({share:.0%} of the machine){_DISTURBED if share > _DISTURBED_SHARE else ''}",
            flush=True,
        )
    for problem in campaign.problems:
        print(f"problem: {problem}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--devices", type=int, default=1000, help="lamps in the campaign")
    parser.add_argument(
        "--image-kib", type=int, default=256, help="image size (header and body), KiB"
    )
    parser.add_argument("--backend", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument(
        "--pg",
        default=os.environ.get("CITYTWIN_BENCH_PG") or os.environ.get("CITYTWIN_TEST_PG", ""),
        metavar="DSN",
        help="PostgreSQL for --backend postgres (a database per run is created from this DSN)",
    )
    parser.add_argument(
        "--bare-clients", type=int, help="clients downloading from the bare server (--devices)"
    )
    parser.add_argument(
        "--reboot-seconds",
        type=float,
        default=DEFAULT_REBOOT_SECONDS,
        help="how long a lamp is away rebooting into the new image (%(default)g)",
    )
    parser.add_argument("--bare-server", help=argparse.SUPPRESS)
    parser.add_argument("--pki", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--image", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare_server:
        site = bare_site(args.image.read_bytes())
        asyncio.run(serve_bare(site, args.pki, args.bare_server, args.port))
        return
    if args.backend == "postgres" and not args.pg:
        raise SystemExit("--backend postgres needs --pg DSN (or CITYTWIN_BENCH_PG)")
    if args.bare_clients is None:
        args.bare_clients = args.devices
    # aiocoap warns of every connection that ends after its context was shut down, which
    # rebooting lamps do all the time (as in `citytwin simulate`).
    logging.getLogger("coap").setLevel(logging.ERROR)
    raise_fd_limit(max(args.devices, args.bare_clients))
    print(
        f"firmware campaign over {args.devices} simulated lamps ({FIRMWARE[Kind.LAMP]} ->"
        f" {_NEW_VERSION}), a {args.image_kib} KiB MCUboot image in 1024-byte blocks over"
        f" coaps+tcp, each lamp its own connection; bare aiocoap Site, {args.bare_clients}"
        f" clients at once; {os.cpu_count()}-core machine",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as directory:
        image = signed_image(Path(directory), args.image_kib)
    bare = run_bare(args, image.data)

    import tests.conftest as harness

    # The harness reads the PostgreSQL DSN once at import; the bench sets it from --pg.
    harness.PG_DSN = args.pg
    campaign = run_citytwin(args.backend, args, image)
    print_table(args.backend, image, campaign, bare)


if __name__ == "__main__":
    main()
