"""Benchmark: server memory per connected, observing device, against bare aiocoap TLS servers
holding as many connections, measured in the same run.

    .venv/bin/python bench/connections.py [--devices 1000,5000] [--breakdown]

Each server is a separate process on 127.0.0.1; the devices are aiocoap clients in this
process, each with its own certificate and its own `coaps+tcp` connection, observing
`/twin/desired`. The server's resident memory (VmRSS in /proc/PID/status) is read before any
device connects and once the first 1,000, then 5,000 devices are connected and their
observations registered; the growth divided by the devices connected is the cost of one.

Five servers, each with the same TLS settings (`server_ssl_context`, client certificates):

* bare aiocoap `tlsserver`: aiocoap's own TLS transport, i.e. asyncio's TLS protocol with its
  fixed 256 KiB read buffer per connection, and a plain aiocoap ObservableResource (a task
  per observer);
* bare `start_tls_server`: citytwin's transport (`twin.tls_stream`: one small object per
  connection over an `ssl.SSLSocket`, one read buffer per listener) and observations as
  citytwin serves them (`twin.pipe_observations`: one small object per observer, no task);
* the same with aiocoap's ObservableResource instead (as the first server), which isolates
  what aiocoap's observation machinery costs;
* the same as the second with devices that send only their own certificate. Our Python
  devices (`client_ssl_context`, as the simulator and the other servers' devices use it) send
  the issuing and root CA certificates too: OpenSSL completes a client's chain from its trust
  store unless told not to, and the server keeps the parsed copy of every certificate sent
  for as long as the connection. These devices trust only the root CA, so OpenSSL finds no
  issuer to add, as a device stack configured with just its own certificate behaves;
* citytwin on SQLite: the real thing, devices enrolled first (that takes a while: ~200/s).
  Its "before" is after enrollment, the enrollment connections closed. The backend does not
  matter for what a connection costs, so there is no PostgreSQL run.

`--breakdown` splits a bare `start_tls_server` device's cost (pipe observations) with two
more bare runs: one with `tracemalloc` on in the server (the Python objects: the connection,
the observation; tracemalloc's own bookkeeping inflates that run's RSS, so only its traced
bytes count), one with devices presenting no client certificate (what OpenSSL's parsed copies
of the certificates a device sends cost; with the leaf-only run, what the CA certificates
among them cost). The rest of the RSS growth is OpenSSL's per-connection state and the
allocator's overhead.

The process's open-file limit is raised as far as the devices need (the servers inherit it).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import signal
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import aiocoap
import aiocoap.resource
from aiocoap.numbers.codes import Code
from aiocoap.pipe import Pipe
from cryptography import x509
from cryptography.hazmat.primitives import serialization

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.devices import (
    BareServer,
    DeviceCredentials,
    LocalPki,
    Observer,
    bounded,
    close_devices,
    connect_devices,
    enroll_devices,
    process_rss_kib,
    raise_fd_limit,
    serve_bare,
)
from tests.conftest import Server, free_port, new_database, run_cli
from twin.coap_tls import client_ssl_context, device_client_context
from twin.pipe_observations import PipeObservation

# Devices setting up at once: enough to keep the server busy.
_CONNECT_CONCURRENCY = 64
# After the last observation is registered, time for the server to finish what it started
# (feed entries, liveness writes, freed handshake state) before RSS is read.
_SETTLE_SECONDS = 2.0
# How long a traced server may take to report its Python heap (a full gc pass first).
_TRACE_REPORT_SECONDS = 60.0

Connect = Callable[[bytes, Sequence[DeviceCredentials]], Awaitable[list[aiocoap.Context]]]


class BareDesired(aiocoap.resource.ObservableResource):  # type: ignore[misc]
    """`/twin/desired` as a plain aiocoap ObservableResource: an empty JSON document."""

    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        """The (never changing) document."""
        return aiocoap.Message(code=Code.CONTENT, payload=b"{}", content_format=50)


class PipeDesired(aiocoap.resource.Resource):  # type: ignore[misc]
    """`/twin/desired` observed as citytwin serves observations (`PipeObservation`)."""

    async def render_to_pipe(self, pipe: Pipe) -> None:
        """An observation for a GET with Observe: 0, else one answer."""
        if pipe.request.opt.observe != 0:
            await super().render_to_pipe(pipe)
            return
        # Nothing ever triggers it: the pipe that aiocoap keeps for the request holds it.
        await PipeObservation(pipe, self).serve()

    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        """The (never changing) document."""
        return aiocoap.Message(code=Code.CONTENT, payload=b"{}", content_format=50)


def bare_site(observations: str) -> aiocoap.resource.Site:
    """The bare servers' site, observed through aiocoap's ObservableResource ("aiocoap") or
    `PipeObservation` ("pipe")."""
    site = aiocoap.resource.Site()
    resource = BareDesired() if observations == "aiocoap" else PipeDesired()
    site.add_resource(["twin", "desired"], resource)
    return site


@dataclass(frozen=True)
class Row:
    """One server's figures: its RSS before any device connected and at each count (KiB)."""

    label: str
    before: int
    after: dict[int, int]


def print_table(rows: list[Row]) -> None:
    """The table: RSS before, then RSS and KiB per device at each device count."""
    counts = list(rows[0].after)
    heads = "".join(f"   {f'{count} devices: RSS, per device':>36}" for count in counts)
    print(f"{'server':<24} {'RSS before':>12}{heads}", flush=True)
    for row in rows:
        cells = "".join(
            f"   {rss / 1024:>14.1f} MiB, {(rss - row.before) / count:>6.1f} KiB/device"
            for count, rss in row.after.items()
        )
        print(f"{row.label:<24} {row.before / 1024:>8.1f} MiB{cells}", flush=True)


async def connect_anonymous(
    trust_pem: bytes, devices: Sequence[DeviceCredentials]
) -> list[aiocoap.Context]:
    """A client context per device as `connect_devices` makes them, presenting no client
    certificate."""
    tls = client_ssl_context(trust_pem)
    return [await device_client_context(tls) for _ in devices]


async def connect_leaf_only(
    trust_pem: bytes, devices: Sequence[DeviceCredentials]
) -> list[aiocoap.Context]:
    """A client context per device as `connect_devices` makes them, trusting only the
    self-signed (root) certificates of `trust_pem`, so that each device sends only its own
    certificate (see the module docstring)."""
    roots = b"".join(
        cert.public_bytes(serialization.Encoding.PEM)
        for cert in x509.load_pem_x509_certificates(trust_pem)
        if cert.subject == cert.issuer
    )
    return await connect_devices(roots, devices)


async def grow(
    measure: Callable[[], int],
    coaps: str,
    trust_pem: bytes,
    devices: Sequence[DeviceCredentials],
    counts: list[int],
    stop_server: Callable[[], None],
    connect: Connect = connect_devices,
) -> tuple[int, dict[int, int]]:
    """Connect and observe with ever more devices, taking the server's `measure` (KiB) at each
    count; (before, {count: measure}). Stops the server before the clients close (see
    below)."""
    contexts: list[aiocoap.Context] = []
    observers: list[Observer] = []
    uri = f"{coaps}/twin/desired"
    before = measure()
    after: dict[int, int] = {}
    try:
        for count in counts:
            started = time.perf_counter()
            new_contexts = await connect(trust_pem, devices[len(contexts) : count])
            new_observers = [Observer() for _ in new_contexts]
            contexts += new_contexts
            observers += new_observers

            def observe(
                observer: Observer, context: aiocoap.Context
            ) -> Callable[[], Awaitable[None]]:
                return lambda: observer.start(context, uri)

            await bounded(
                _CONNECT_CONCURRENCY,
                [observe(o, c) for o, c in zip(new_observers, new_contexts, strict=True)],
            )
            print(
                f"  ({count} devices connected and observing,"
                f" the last {len(new_contexts)} in {time.perf_counter() - started:.1f} s)",
                flush=True,
            )
            await asyncio.sleep(_SETTLE_SECONDS)
            after[count] = measure()
    finally:
        for observer in observers:
            observer.stop()
        # With the server gone first, aiocoap's client shutdown need not wait for thousands
        # of peers to close their side.
        await asyncio.to_thread(stop_server)
        await close_devices(contexts)
    return before, after


def run_bare(
    transport: str,
    label: str,
    pki: LocalPki,
    devices: list[DeviceCredentials],
    counts: list[int],
    *,
    observations: str = "pipe",
    connect: Connect = connect_devices,
    trace_python: bool = False,
) -> Row:
    """One bare server process with `transport` and `observations` (see `bare_site`), grown
    to each count: its RSS, or with `trace_python` the Python heap tracemalloc sees in it."""
    with tempfile.TemporaryDirectory() as directory:
        pki.save(Path(directory))
        report = Path(directory) / "python-heap"
        extra = ["--observations", observations]
        if trace_python:
            extra += ["--trace-python", str(report)]
        # aiocoap's tlsserver takes no port 0 (it would bind 5684), so give it a free one.
        server = BareServer(__file__, transport, Path(directory), free_port(), extra)

        def measure() -> int:
            if trace_python:
                return traced_kib(server.pid, report)
            return process_rss_kib(server.pid)

        try:
            before, after = asyncio.run(
                grow(
                    measure,
                    f"coaps+tcp://127.0.0.1:{server.port}",
                    pki.trust_pem,
                    devices,
                    counts,
                    server.stop,
                    connect,
                )
            )
        finally:
            server.stop()
    return Row(label, before, after)


def traced_kib(pid: int, report: Path) -> int:
    """The Python heap of a server started with `--trace-python REPORT`, in KiB: it writes
    its traced bytes to REPORT when sent SIGUSR1."""
    report.unlink(missing_ok=True)
    os.kill(pid, signal.SIGUSR1)
    deadline = time.monotonic() + _TRACE_REPORT_SECONDS
    while not report.exists() or not report.read_text().endswith("\n"):
        if time.monotonic() > deadline:
            raise RuntimeError(f"server {pid} did not report its Python heap")
        time.sleep(0.05)
    return int(report.read_text()) // 1024


def report_python_heap_on_signal(report: Path) -> None:
    """In a bare server: trace Python allocations from now on and, on SIGUSR1, write the
    bytes traced (after a full garbage collection) to `report`."""
    tracemalloc.start()

    def write(signum: int, frame: FrameType | None) -> None:
        gc.collect()
        partial = report.with_suffix(".partial")
        partial.write_text(f"{tracemalloc.get_traced_memory()[0]}\n")
        partial.replace(report)

    signal.signal(signal.SIGUSR1, write)


def run_citytwin(counts: list[int]) -> Row:
    """A citytwin server on SQLite: enroll, then grow to each count."""
    with tempfile.TemporaryDirectory() as home:
        db = new_database("sqlite", Path(home))
        token = run_cli(db, "token", "create", "--role", "admin").stdout.strip()
        # Longer than the bench: an observer waiting quietly must not be closed as idle.
        server = Server(db, extra_env={"CITYTWIN_COAPS_IDLE_TIMEOUT": "3600"}).start()
        try:
            trust = run_cli(db, "ca", "show", "--pem").stdout.encode()
            coaps = f"coaps+tcp://127.0.0.1:{server.coaps_port}"
            devices = enroll_devices(server.address, coaps, token, trust, counts[-1], "conn")
            process = server.process
            assert process is not None
            before, after = asyncio.run(
                grow(
                    lambda: process_rss_kib(process.pid),
                    coaps,
                    trust,
                    devices,
                    counts,
                    server.stop,
                )
            )
        finally:
            server.stop()
            db.drop()
    return Row("citytwin on sqlite", before, after)


def print_breakdown(total: Row, python: Row, anonymous: Row, leaf_only: Row) -> None:
    """What one bare `start_tls_server` device costs, split up, at each device count."""
    counts = list(total.after)

    def per_device(row: Row) -> list[float]:
        return [(row.after[count] - row.before) / count for count in counts]

    def minus(row: Row) -> list[float]:
        return [t - r for t, r in zip(per_device(total), per_device(row), strict=True)]

    lines = [
        ("total (RSS growth)", per_device(total)),
        ("  Python objects (tracemalloc)", per_device(python)),
        ("  the rest: OpenSSL, allocator", minus(python)),
        # Mostly OpenSSL's parsed copies; the DER leaf kept in Python is ~0.5 KiB of it.
        ("  certificates sent (vs none), all parts", minus(anonymous)),
        ("    the CA certificates among them", minus(leaf_only)),
    ]
    print(
        f"{'per device, bare start_tls_server':<40}" + "".join(f"{c:>10} devices" for c in counts)
    )
    for label, values in lines:
        print(f"{label:<40}" + "".join(f"{v:>14.1f} KiB" for v in values), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--devices",
        default="1000,5000",
        help="device counts at which to read the server's memory, comma-separated",
    )
    parser.add_argument(
        "--breakdown",
        action="store_true",
        help="split a bare start_tls_server device's cost (two more bare runs)",
    )
    parser.add_argument("--bare-server", help=argparse.SUPPRESS)
    parser.add_argument("--pki", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--trace-python", type=Path, help=argparse.SUPPRESS)
    parser.add_argument(
        "--observations", choices=["aiocoap", "pipe"], default="pipe", help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.bare_server:
        if args.trace_python:
            report_python_heap_on_signal(args.trace_python)
        site = bare_site(args.observations)
        asyncio.run(serve_bare(site, args.pki, args.bare_server, args.port))
        return

    counts = sorted(int(c) for c in args.devices.split(","))
    raise_fd_limit(counts[-1])
    print(
        f"server RSS per connected device observing /twin/desired, each its own coaps+tcp"
        f" connection and certificate; {os.cpu_count()}-core machine",
        flush=True,
    )
    pki = LocalPki.create()
    devices = pki.devices(counts[-1])
    rows = [
        run_bare("aiocoap", "bare aiocoap tlsserver", pki, devices, counts, observations="aiocoap"),
        run_bare("citytwin", "bare start_tls_server", pki, devices, counts),
        run_bare(
            "citytwin", "  aiocoap's observations", pki, devices, counts, observations="aiocoap"
        ),
        run_bare(
            "citytwin", "  leaf-only devices", pki, devices, counts, connect=connect_leaf_only
        ),
        run_citytwin(counts),
    ]
    print_table(rows)
    if args.breakdown:
        python = run_bare("citytwin", "Python objects", pki, devices, counts, trace_python=True)
        anonymous = run_bare(
            "citytwin", "anonymous devices", pki, devices, counts, connect=connect_anonymous
        )
        print_breakdown(rows[1], python, anonymous, rows[3])


if __name__ == "__main__":
    main()
