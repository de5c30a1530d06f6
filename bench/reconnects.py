"""Benchmark: a reconnect storm and a mass disconnect, against a bare server with citytwin's
transport and observations, measured in the same run.

    .venv/bin/python bench/reconnects.py [--devices 1000] [--pg DSN] [--profile DIR]
                                         [--concurrency 0] [--bare-only]

When the server restarts or a district's network comes back, every device reconnects at once:
TCP connect, TLS handshake with its client certificate (only its leaf, as our clients send
it), then `GET /twin/desired` with Observe: 0 and the first answer. When a district's network
fails (or a feeder switches a street's lamps off), the server sees every one of those
connections end at once. Both are timed here, for `--devices` already-enrolled devices:

* storm: every device's first request is made at the same moment (`--concurrency N`: at
  most N devices connecting at a time, as a staggered reconnect would);
  time-to-first-notification is from that moment to the device's first 2.05; the rate is the
  devices divided by the time until the last of them had it;
* disconnect: every device's socket is closed at the same moment, without a TLS close_notify
  or CoAP Release (as a dead network, a power cut or a NAT reset ends them); timed until the
  server has closed every one of its sockets (its open descriptors, /proc/PID/fd, are back
  to what they were before the storm).

After each phase the bench waits until the server is idle (its CPU time stops growing) and
counts the server CPU used from the phase's start to then, per device. Meanwhile a probe
client, connected before the phase, sends one small request after another (an anonymous
`GET /twin/desired`, which both servers answer without a database: the bare one with the
document, citytwin with 4.01); the slowest probe answer is how long any other device waits
while the server is busy with the storm or the disconnects. The probe runs on this process's
event loop, so during the storm it also waits for the devices' own handshakes here: read
that column as an upper bound there; during the disconnect this process has little to do.

The devices and the probe are aiocoap clients in this process, so on the 2-core machine they
compete with the server for the cores; the server is a separate process, and its CPU time
(utime + stime from /proc/PID/stat) counts only its own work, whoever was waiting on whom.
The bench's own CPU time is printed too, and the server's share of the wall-clock time shows
whether it was the bottleneck (close to 100%: one event loop, one core).

The servers, each on 127.0.0.1:

* bare `start_tls_server`: citytwin's transport (twin/coap_tls.py, twin/tls_stream.py) and
  observations as citytwin serves them (twin/pipe_observations.py), answering a constant
  document: what CoAP over TLS and an observation cost, nothing else (bench/connections.py's
  bare server);
* citytwin on SQLite, and on PostgreSQL with --pg (default: CITYTWIN_BENCH_PG or
  CITYTWIN_TEST_PG): the devices are enrolled first, then the server is restarted (the storm
  a restart causes, with its caches cold), then the storm and the disconnect.

`--profile DIR` records the server with py-spy during each phase (`DIR/STACK-PHASE.txt`,
py-spy's raw format, one line per distinct stack with its sample count).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import aiocoap

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.connections import bare_site
from bench.devices import (
    BareServer,
    DeviceCredentials,
    LocalPki,
    bounded,
    close_devices,
    connect_devices,
    enroll_devices,
    percentile,
    process_cpu_seconds,
    raise_fd_limit,
    serve_bare,
)
from tests.conftest import Server, new_database, run_cli
from twin.coap_tls import client_ssl_context, device_client_context

# A storm of thousands takes a while: the first answer may come long after the request.
_STORM_TIMEOUT_SECONDS = 300.0
# The server counts as idle once its CPU time grew by at most _IDLE_CPU_SECONDS over
# _IDLE_WINDOW_SECONDS (background loops, the kernel's tick granularity of 10 ms).
_IDLE_WINDOW_SECONDS = 1.0
_IDLE_CPU_SECONDS = 0.03
_POLL_SECONDS = 0.02
# Probes between phases are not counted; one waits at most this long for its answer.
_PROBE_TIMEOUT_SECONDS = 120.0
_PROBE_PAUSE_SECONDS = 0.01


@dataclass
class Phase:
    """What one phase measured."""

    devices: int
    wall: float  # until the last device's first answer, or the server's last socket closed
    server_cpu: float  # seconds, from the phase's start until the server was idle again
    client_cpu: float  # this process's, same span
    busy: float  # from the phase's start until the server was last seen busy
    probes: list[float] = field(default_factory=list)
    delays: list[float] = field(default_factory=list)  # storm: time to first answer

    @property
    def server_share(self) -> float:
        """The server's CPU time over the time it was busy (1.0: one core all along)."""
        return self.server_cpu / self.busy if self.busy > 0 else 0.0

    @property
    def worst_probe(self) -> float:
        """The slowest probe answer (0 if none was timed)."""
        return max(self.probes, default=0.0)


@dataclass
class Result:
    """A stack's storm and disconnect."""

    label: str
    storm: Phase
    disconnect: Phase


def open_fds(pid: int) -> int:
    """How many descriptors process `pid` has open."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def server_cpu(pid: int) -> float:
    """The server's CPU time so far; Linux only, as the bench's premise is."""
    seconds = process_cpu_seconds(pid)
    if seconds is None:
        raise SystemExit("this bench reads /proc/PID/stat: it needs Linux")
    return seconds


async def until_idle(pid: int, started: float) -> tuple[float, float]:
    """Wait until the server is idle (see _IDLE_*); (its CPU time then, the last moment, as
    perf_counter() - `started`, at which it was seen busy)."""
    samples: list[tuple[float, float]] = [(time.perf_counter(), server_cpu(pid))]
    busy_until = samples[0][0]
    while True:
        await asyncio.sleep(_POLL_SECONDS)
        now, cpu = time.perf_counter(), server_cpu(pid)
        if cpu > samples[-1][1]:
            busy_until = now
        samples.append((now, cpu))
        window = [s for s in samples if s[0] >= now - _IDLE_WINDOW_SECONDS]
        if now - samples[0][0] >= _IDLE_WINDOW_SECONDS and cpu - window[0][1] <= _IDLE_CPU_SECONDS:
            return cpu, busy_until - started


async def until_closed(pid: int, descriptors: int) -> None:
    """Wait until the server has at most `descriptors` open (its sockets closed)."""
    while open_fds(pid) > descriptors:  # noqa: ASYNC110 (another process: nothing to await)
        await asyncio.sleep(_POLL_SECONDS)


@asynccontextmanager
async def probing(
    context: aiocoap.Context, uri: str, latencies: list[float]
) -> AsyncIterator[None]:
    """While the block runs, send one `GET uri` after another on `context` (one connection,
    already open) and append each answer's latency to `latencies`."""
    stop = asyncio.Event()

    async def probe() -> None:
        while not stop.is_set():
            started = time.perf_counter()
            request = context.request(aiocoap.Message(code=aiocoap.GET, uri=uri))
            await asyncio.wait_for(request.response, _PROBE_TIMEOUT_SECONDS)
            latencies.append(time.perf_counter() - started)
            await asyncio.sleep(_PROBE_PAUSE_SECONDS)

    task = asyncio.create_task(probe())
    try:
        yield
    finally:
        stop.set()
        await task


class Profiler:
    """py-spy recording the server during a phase, if a directory was given."""

    def __init__(self, directory: Path | None, pid: int, name: str) -> None:
        self.process: subprocess.Popen[bytes] | None = None
        if directory is None:
            return
        directory.mkdir(parents=True, exist_ok=True)
        py_spy = Path(sys.executable).with_name("py-spy")
        output = directory / f"{name}.txt"
        self.process = subprocess.Popen(
            [
                str(py_spy),
                "record",
                "--nonblocking",
                "-p",
                str(pid),
                "-f",
                "raw",
                "-o",
                str(output),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(1.0)  # attaching takes a moment; the phase must not start before

    def stop(self) -> None:
        """Stop recording; py-spy writes its file on SIGINT."""
        if self.process is not None:
            self.process.send_signal(signal.SIGINT)
            self.process.wait(timeout=60)


def abort_connections(contexts: Sequence[aiocoap.Context]) -> int:
    """Close every client context's connections at once, as a dead network would end them:
    no TLS close_notify, no CoAP Release. Returns how many were closed.

    aiocoap offers no way to drop a client connection, so this reaches into the TLS client
    transport's pool (aiocoap 0.4.17: each token manager's `token_interface._pool` maps
    (host, port) to a TcpConnection whose `_transport` is asyncio's TLS transport)."""
    closed = 0
    for context in contexts:
        for manager in context.request_interfaces:
            pool: dict[Any, Any] = getattr(manager.token_interface, "_pool", {})
            for connection in list(pool.values()):
                if connection._transport is not None:
                    connection._transport.abort()
                    closed += 1
    return closed


async def storm_and_disconnect(
    label: str,
    pid: int,
    coaps: str,
    trust_pem: bytes,
    devices: Sequence[DeviceCredentials],
    profile: Path | None,
    concurrency: int,
) -> Result:
    """Connect and observe with every device at once (or `concurrency` at a time), wait for
    the server to settle, then drop every connection at once; the two phases' figures."""
    uri = f"{coaps}/twin/desired"
    contexts = await connect_devices(trust_pem, devices)  # no connection yet: lazy in aiocoap
    prober = await device_client_context(client_ssl_context(trust_pem))
    requests: list[Any] = []
    name = label.replace(" ", "-")
    try:
        await prober.request(aiocoap.Message(code=aiocoap.GET, uri=uri)).response  # connects
        # Full collections over thousands of new client objects would land in the timings.
        gc.collect()
        gc.freeze()
        fds_before = open_fds(pid)

        # -- the storm ------------------------------------------------------------------
        profiler = Profiler(profile, pid, f"{name}-storm")
        storm_probes: list[float] = []
        delays: list[float] = []
        cpu, client, started = server_cpu(pid), time.process_time(), time.perf_counter()

        async def observe(context: aiocoap.Context) -> None:
            request = context.request(aiocoap.Message(code=aiocoap.GET, uri=uri, observe=0))
            requests.append(request)
            first = await asyncio.wait_for(request.response, _STORM_TIMEOUT_SECONDS)
            delays.append(time.perf_counter() - started)
            if not first.code.is_successful():
                raise RuntimeError(f"{uri}: {first.code} {first.payload!r}")

        async with probing(prober, uri, storm_probes):
            await bounded(concurrency or len(contexts), [partial(observe, c) for c in contexts])
        wall = time.perf_counter() - started
        cpu_after, busy = await until_idle(pid, started)
        storm = Phase(
            len(devices),
            wall,
            cpu_after - cpu,
            time.process_time() - client,
            max(busy, wall),
            storm_probes,
            sorted(delays),
        )
        profiler.stop()
        print(
            f"  ({label}: {len(devices)} devices observing after {wall:.1f} s;"
            f" {open_fds(pid) - fds_before} more server descriptors)",
            flush=True,
        )

        # -- the mass disconnect --------------------------------------------------------
        profiler = Profiler(profile, pid, f"{name}-disconnect")
        disconnect_probes: list[float] = []
        cpu, client, started = server_cpu(pid), time.process_time(), time.perf_counter()
        async with probing(prober, uri, disconnect_probes):
            closed = abort_connections(contexts)
            await until_closed(pid, fds_before)
            wall = time.perf_counter() - started
        cpu_after, busy = await until_idle(pid, started)
        disconnect = Phase(
            closed,
            wall,
            cpu_after - cpu,
            time.process_time() - client,
            max(busy, wall),
            disconnect_probes,
        )
        profiler.stop()
    finally:
        for request in requests:
            if not request.observation.cancelled:  # a lost connection cancels it already
                request.observation.cancel()
        await close_devices([*contexts, prober])
        gc.unfreeze()
    return Result(label, storm, disconnect)


def run_bare(
    pki: LocalPki, devices: Sequence[DeviceCredentials], profile: Path | None, concurrency: int
) -> Result:
    """The bare server (start_tls_server, pipe observations) as a separate process."""
    with tempfile.TemporaryDirectory() as directory:
        pki.save(Path(directory))
        server = BareServer(__file__, "citytwin", Path(directory), 0)
        try:
            return asyncio.run(
                storm_and_disconnect(
                    "bare start_tls_server",
                    server.pid,
                    f"coaps+tcp://127.0.0.1:{server.port}",
                    pki.trust_pem,
                    devices,
                    profile,
                    concurrency,
                )
            )
        finally:
            server.stop()


def run_citytwin(backend: str, count: int, profile: Path | None, concurrency: int) -> Result:
    """citytwin on `backend`: enroll `count` devices, restart the server, storm, disconnect."""
    with tempfile.TemporaryDirectory() as home:
        db = new_database(backend, Path(home))
        # Longer than the bench: an observer waiting quietly must not be closed as idle.
        env = {"CITYTWIN_COAPS_IDLE_TIMEOUT": "3600"}
        server = Server(db, extra_env=env)
        try:
            token = run_cli(db, "token", "create", "--role", "admin").stdout.strip()
            server.start()
            trust = run_cli(db, "ca", "show", "--pem").stdout.encode()
            coaps = f"coaps+tcp://127.0.0.1:{server.coaps_port}"
            devices = enroll_devices(server.address, coaps, token, trust, count, "storm")
            # What the devices reconnect to: a server that has just started.
            server.stop()
            server = Server(db, extra_env=env).start()
            assert server.process is not None
            return asyncio.run(
                storm_and_disconnect(
                    f"citytwin on {backend}",
                    server.process.pid,
                    f"coaps+tcp://127.0.0.1:{server.coaps_port}",
                    trust,
                    devices,
                    profile,
                    concurrency,
                )
            )
        finally:
            server.stop()
            db.drop()


def print_results(results: list[Result]) -> None:
    """Two tables, each row against the bare server's (the first result)."""
    bare = results[0]
    print("\nstorm: connect + TLS + observe /twin/desired + first answer, all devices at once")
    print(
        f"{'stack':<26} {'devices/s':>10} {'p50':>10} {'p99':>10} {'vs bare':>8}"
        f" {'server CPU/device':>18} {'server busy':>12} {'bench CPU':>10} {'worst probe':>12}"
    )
    for result in results:
        storm = result.storm
        rate = storm.devices / storm.wall
        print(
            f"{result.label:<26} {rate:>10,.0f}"
            f" {statistics.median(storm.delays) * 1000:>7,.0f} ms"
            f" {percentile(storm.delays, 0.99) * 1000:>7,.0f} ms"
            f" {rate / (bare.storm.devices / bare.storm.wall):>7.2f}x"
            f" {storm.server_cpu / storm.devices * 1000:>12.2f} ms"
            f" {storm.server_share * 100:>11.0f}%"
            f" {storm.client_cpu:>8.1f} s"
            f" {storm.worst_probe * 1000:>9,.0f} ms",
            flush=True,
        )
    print("\nmass disconnect: every device's connection dropped at once")
    print(
        f"{'stack':<26} {'all closed':>11} {'server busy':>12} {'server CPU':>11}"
        f" {'per conn':>10} {'vs bare':>8} {'worst probe':>12}"
    )
    for result in results:
        gone = result.disconnect
        per = gone.server_cpu / gone.devices
        bare_per = bare.disconnect.server_cpu / bare.disconnect.devices
        print(
            f"{result.label:<26} {gone.wall * 1000:>8,.0f} ms {gone.busy * 1000:>9,.0f} ms"
            f" {gone.server_cpu * 1000:>8,.0f} ms {per * 1e6:>7,.0f} µs"
            f" {per / bare_per if bare_per else float('inf'):>7.1f}x"
            f" {gone.worst_probe * 1000:>9,.0f} ms",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--devices", type=int, default=1000, help="devices reconnecting at once")
    parser.add_argument(
        "--pg",
        default=os.environ.get("CITYTWIN_BENCH_PG") or os.environ.get("CITYTWIN_TEST_PG", ""),
        metavar="DSN",
        help="also run on PostgreSQL (a database per run is created from this DSN)",
    )
    parser.add_argument(
        "--concurrency", type=int, default=0, help="devices connecting at a time (0: all)"
    )
    parser.add_argument("--bare-only", action="store_true", help="only the bare server")
    parser.add_argument(
        "--profile", type=Path, metavar="DIR", help="record the servers with py-spy into DIR"
    )
    parser.add_argument("--bare-server", help=argparse.SUPPRESS)
    parser.add_argument("--pki", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare_server:
        asyncio.run(serve_bare(bare_site("pipe"), args.pki, args.bare_server, args.port))
        return

    raise_fd_limit(args.devices + 1)
    print(
        f"{args.devices} devices reconnecting at once, each its own coaps+tcp connection and"
        f" certificate (leaf only); {os.cpu_count()}-core machine",
        flush=True,
    )
    pki = LocalPki.create()
    results = [run_bare(pki, pki.devices(args.devices), args.profile, args.concurrency)]
    if not args.bare_only:
        import tests.conftest as harness

        # The harness reads the PostgreSQL DSN once at import; the bench sets it from --pg.
        harness.PG_DSN = args.pg
        for backend in ["sqlite", "postgres"] if args.pg else ["sqlite"]:
            results.append(run_citytwin(backend, args.devices, args.profile, args.concurrency))
    print_results(results)


if __name__ == "__main__":
    main()
