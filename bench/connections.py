"""Benchmark: server memory per connected, observing device, against bare aiocoap TLS servers
holding as many connections, measured in the same run.

    .venv/bin/python bench/connections.py [--devices 1000,5000]

Each server is a separate process on 127.0.0.1; the devices are aiocoap clients in this
process, each with its own certificate and its own `coaps+tcp` connection, observing
`/twin/desired`. The server's resident memory (VmRSS in /proc/PID/status) is read before any
device connects and once the first 1,000, then 5,000 devices are connected and their
observations registered; the growth divided by the devices connected is the cost of one.

Three servers, each with the same TLS settings (`server_ssl_context`, client certificates):

* bare aiocoap `tlsserver`: aiocoap's own TLS transport, i.e. asyncio's TLS protocol with its
  fixed 256 KiB read buffer per connection, and a plain ObservableResource;
* bare `start_tls_server`: citytwin's transport (record-sized `READ_BUFFER_BYTES` buffers)
  with the same ObservableResource, which isolates what the smaller buffer buys;
* citytwin on SQLite: the real thing, devices enrolled first (that takes a while: ~200/s).
  Its "before" is after enrollment, the enrollment connections closed. The backend does not
  matter for what a connection costs, so there is no PostgreSQL run.

The process's open-file limit is raised as far as the devices need (the servers inherit it).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import aiocoap
import aiocoap.resource
from aiocoap.numbers.codes import Code

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

# Devices setting up at once: enough to keep the server busy.
_CONNECT_CONCURRENCY = 64
# After the last observation is registered, time for the server to finish what it started
# (feed entries, liveness writes, freed handshake state) before RSS is read.
_SETTLE_SECONDS = 2.0


class BareDesired(aiocoap.resource.ObservableResource):  # type: ignore[misc]
    """`/twin/desired` as a plain aiocoap ObservableResource: an empty JSON document."""

    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        """The (never changing) document."""
        return aiocoap.Message(code=Code.CONTENT, payload=b"{}", content_format=50)


def bare_site() -> aiocoap.resource.Site:
    """The bare servers' site."""
    site = aiocoap.resource.Site()
    site.add_resource(["twin", "desired"], BareDesired())
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


async def grow(
    pid: int,
    coaps: str,
    trust_pem: bytes,
    devices: Sequence[DeviceCredentials],
    counts: list[int],
    stop_server: Callable[[], None],
) -> tuple[int, dict[int, int]]:
    """Connect and observe with ever more devices, reading the server's RSS at each count;
    (RSS before, {count: RSS}). Stops the server before the clients close (see below)."""
    contexts: list[aiocoap.Context] = []
    observers: list[Observer] = []
    uri = f"{coaps}/twin/desired"
    before = process_rss_kib(pid)
    after: dict[int, int] = {}
    try:
        for count in counts:
            started = time.perf_counter()
            new_contexts = await connect_devices(trust_pem, devices[len(contexts) : count])
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
            after[count] = process_rss_kib(pid)
    finally:
        for observer in observers:
            observer.stop()
        # With the server gone first, aiocoap's client shutdown need not wait for thousands
        # of peers to close their side.
        await asyncio.to_thread(stop_server)
        await close_devices(contexts)
    return before, after


def run_bare(
    transport: str, label: str, pki: LocalPki, devices: list[DeviceCredentials], counts: list[int]
) -> Row:
    """One bare server process with `transport`, grown to each count."""
    with tempfile.TemporaryDirectory() as directory:
        pki.save(Path(directory))
        # aiocoap's tlsserver takes no port 0 (it would bind 5684), so give it a free one.
        server = BareServer(__file__, transport, Path(directory), free_port())
        try:
            before, after = asyncio.run(
                grow(
                    server.pid,
                    f"coaps+tcp://127.0.0.1:{server.port}",
                    pki.trust_pem,
                    devices,
                    counts,
                    server.stop,
                )
            )
        finally:
            server.stop()
    return Row(label, before, after)


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
            assert server.process is not None
            before, after = asyncio.run(
                grow(server.process.pid, coaps, trust, devices, counts, server.stop)
            )
        finally:
            server.stop()
            db.drop()
    return Row("citytwin on sqlite", before, after)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--devices",
        default="1000,5000",
        help="device counts at which to read the server's memory, comma-separated",
    )
    parser.add_argument("--bare-server", help=argparse.SUPPRESS)
    parser.add_argument("--pki", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare_server:
        asyncio.run(serve_bare(bare_site(), args.pki, args.bare_server, args.port))
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
        run_bare("aiocoap", "bare aiocoap tlsserver", pki, devices, counts),
        run_bare("citytwin", "bare start_tls_server", pki, devices, counts),
        run_citytwin(counts),
    ]
    print_table(rows)


if __name__ == "__main__":
    main()
