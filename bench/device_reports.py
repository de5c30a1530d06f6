"""Benchmark: committed device reports per second and their p50/p99 latency with many devices
at once, against a bare aiocoap handler on the same transport, measured in the same run.

    .venv/bin/python bench/device_reports.py [--seconds 8] [--devices 64] [--interval 0]
                                             [--pg DSN]

Runs on SQLite always, and on PostgreSQL too with --pg (default: CITYTWIN_BENCH_PG or
CITYTWIN_TEST_PG). Each server is a separate process on 127.0.0.1; the devices are aiocoap
clients in this process, each with its own certificate and its own `coaps+tcp` connection.
Every device POSTs a CBOR merge patch of its reported state (`{"power": true, "brightness":
N}`, N changing every time) to `/twin/reported`, waits for the 2.04 and sends the next, for
`--seconds`. With `--interval S` each device instead reports once every S seconds (the
devices' first reports spread over one interval), as a fleet does: then the rate is set by
the devices, and what counts is the server's CPU per report and its share of a core, with
caches that have gone cold between one device's reports (the certificate lookup's lasts 2 s).
Before the timed part every device sends one report untimed, which opens its
connection (the TLS handshake is not what is measured here).

citytwin answers 2.04 only once the report is committed (identity check, liveness, profile
validation, twin row, change feed), the reports that arrive together sharing a transaction
(group commit, twin/grouped_calls.py); the device write rate limit is off for the run. The
bare server is a minimal
aiocoap Resource answering 2.04 to POST, behind the same `start_tls_server` transport with
the same TLS settings (`server_ssl_context`, client certificates) and a CA of the bench's own,
so the ratio says what citytwin costs on top of CoAP over TLS.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiocoap
import aiocoap.resource
import cbor2
from aiocoap.numbers.codes import Code

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.devices import (
    CBOR,
    REQUEST_TIMEOUT_SECONDS,
    BareServer,
    DeviceCredentials,
    LocalPki,
    close_devices,
    connect_devices,
    enroll_devices,
    percentile,
    process_cpu_seconds,
    raise_fd_limit,
    serve_bare,
)
from tests.conftest import Server, new_database, run_cli


class BareReported(aiocoap.resource.Resource):  # type: ignore[misc]
    """`/twin/reported` with nothing behind it: every POST is answered 2.04 at once."""

    async def render_post(self, request: aiocoap.Message) -> aiocoap.Message:
        """2.04 Changed, whatever the body."""
        return aiocoap.Message(code=Code.CHANGED)


def bare_site() -> aiocoap.resource.Site:
    """The bare server's site: the one resource the devices POST to."""
    site = aiocoap.resource.Site()
    site.add_resource(["twin", "reported"], BareReported())
    return site


@dataclass(frozen=True)
class Result:
    """One row of the table."""

    rate: float  # committed reports per second
    p50: float  # milliseconds
    p99: float  # milliseconds


async def load(
    coaps: str,
    trust_pem: bytes,
    devices: list[DeviceCredentials],
    seconds: float,
    interval: float,
) -> tuple[list[float], float]:
    """Every device reports for `seconds`, back to back (`interval` 0) or once every
    `interval` seconds; (latencies, wall seconds)."""
    uri = f"{coaps}/twin/reported"
    contexts = await connect_devices(trust_pem, devices)

    async def report(context: aiocoap.Context, level: int) -> None:
        body = cbor2.dumps({"power": True, "brightness": level})
        message = aiocoap.Message(code=aiocoap.POST, uri=uri, payload=body, content_format=CBOR)
        response = await asyncio.wait_for(
            context.request(message).response, REQUEST_TIMEOUT_SECONDS
        )
        if response.code != Code.CHANGED:
            raise RuntimeError(f"report refused: {response.code} {response.payload!r}")

    latencies: list[float] = []

    async def device(index: int, context: aiocoap.Context, deadline: float) -> None:
        level = index % 101
        # Paced devices start spread over one interval, as a fleet's reports are.
        next_at = began + interval * index / len(contexts)
        while True:
            if interval:
                await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
                next_at += interval
            if time.perf_counter() >= deadline:
                return
            # A new value every time, so that every report is a real change to commit.
            level = (level + 1) % 101
            started = time.perf_counter()
            await report(context, level)
            latencies.append(time.perf_counter() - started)

    try:
        # Untimed: the first report of each device opens its TLS connection.
        await asyncio.gather(*(report(c, 0) for c in contexts))
        # A full collection over the connection objects made so far would pause every device
        # at once and land in the p99; nothing of them is garbage, so freeze them.
        gc.collect()
        gc.freeze()
        began = time.perf_counter()
        deadline = began + seconds
        await asyncio.gather(*(device(i, c, deadline) for i, c in enumerate(contexts)))
        elapsed = time.perf_counter() - began
    finally:
        gc.unfreeze()
        await close_devices(contexts)
    return latencies, elapsed


def measure(
    label: str,
    coaps: str,
    trust_pem: bytes,
    devices: list[DeviceCredentials],
    seconds: float,
    server_pid: int,
    interval: float,
) -> Result:
    """Run the load against one server; print its row (and the server's CPU) and return it."""
    cpu_before = process_cpu_seconds(server_pid)
    latencies, elapsed = asyncio.run(load(coaps, trust_pem, devices, seconds, interval))
    cpu_after = process_cpu_seconds(server_pid)
    latencies.sort()
    result = Result(
        rate=len(latencies) / elapsed,
        p50=statistics.median(latencies) * 1000,
        p99=percentile(latencies, 0.99) * 1000,
    )
    print(
        f"{label:<34} {result.rate:>8.0f}/s   p50 {result.p50:7.2f} ms   p99 {result.p99:7.2f} ms",
        flush=True,
    )
    # Whether the server was the bottleneck: its CPU share of the timed phase (which includes
    # the untimed warm-up report, a small share).
    if cpu_before is not None and cpu_after is not None:
        used = cpu_after - cpu_before
        print(
            f"{'':<34} server CPU {used / len(latencies) * 1000:.2f} ms per report,"
            f" {used / elapsed:.0%} of a core",
            flush=True,
        )
    return result


def run_bare(args: argparse.Namespace) -> Result:
    """The bare aiocoap handler behind start_tls_server, in a process of its own."""
    pki = LocalPki.create()
    devices = pki.devices(args.devices)
    with tempfile.TemporaryDirectory() as directory:
        pki.save(Path(directory))
        server = BareServer(__file__, "citytwin", Path(directory), 0)
        try:
            return measure(
                "bare aiocoap handler, start_tls",
                f"coaps+tcp://127.0.0.1:{server.port}",
                pki.trust_pem,
                devices,
                args.seconds,
                server.pid,
                args.interval,
            )
        finally:
            server.stop()


def run_backend(backend: str, args: argparse.Namespace, bare: Result) -> None:
    """Start a citytwin server on `backend`, enroll the devices, load it, print the rows."""
    with tempfile.TemporaryDirectory() as home:
        db = new_database(backend, Path(home))
        token = run_cli(db, "token", "create", "--role", "admin").stdout.strip()
        # Each device reports back to back, far beyond any device's write rate limit.
        server = Server(db, extra_env={"CITYTWIN_DEVICE_WRITES_PER_MINUTE": "0"}).start()
        try:
            # The fleet CA exists once the server has started.
            trust = run_cli(db, "ca", "show", "--pem").stdout.encode()
            coaps = f"coaps+tcp://127.0.0.1:{server.coaps_port}"
            devices = enroll_devices(server.address, coaps, token, trust, args.devices, "reports")
            assert server.process is not None
            result = measure(
                f"citytwin on {backend}",
                coaps,
                trust,
                devices,
                args.seconds,
                server.process.pid,
                args.interval,
            )
            print(
                f"{'':<34} ratio to bare: throughput {result.rate / bare.rate:.2f}x,"
                f" p50 {result.p50 / bare.p50:.1f}x, p99 {result.p99 / bare.p99:.1f}x",
                flush=True,
            )
        finally:
            server.stop()
            db.drop()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="timed reporting per row")
    parser.add_argument("--devices", type=int, default=64, help="concurrent devices")
    parser.add_argument(
        "--interval",
        type=float,
        default=0.0,
        help="seconds between one device's reports (0: back to back, the throughput test)",
    )
    parser.add_argument(
        "--pg",
        default=os.environ.get("CITYTWIN_BENCH_PG") or os.environ.get("CITYTWIN_TEST_PG", ""),
        metavar="DSN",
        help="also run on PostgreSQL (a database per run is created from this DSN)",
    )
    parser.add_argument("--bare-server", help=argparse.SUPPRESS)
    parser.add_argument("--pki", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare_server:
        asyncio.run(serve_bare(bare_site(), args.pki, args.bare_server, args.port))
        return

    raise_fd_limit(args.devices)
    pace = f"every {args.interval:g} s" if args.interval else "back to back"
    print(
        f"{args.devices} devices, each its own coaps+tcp connection and certificate, reporting"
        f" {pace} for {args.seconds:.0f} s per row; {os.cpu_count()}-core machine",
        flush=True,
    )
    bare = run_bare(args)

    import tests.conftest as harness

    # The harness reads the PostgreSQL DSN once at import; the bench sets it from --pg.
    harness.PG_DSN = args.pg
    for backend in ["sqlite", "postgres"] if args.pg else ["sqlite"]:
        run_backend(backend, args, bare)


if __name__ == "__main__":
    main()
