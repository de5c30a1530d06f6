"""Benchmark: how long a desired change made through gRPC takes to reach 1,000 observing
devices, against a bare aiocoap ObservableResource pushing to as many observers (the lower
bound), measured in the same run.

    .venv/bin/python bench/desired_push.py [--devices 1000] [--concurrency 16] [--pg DSN]

Runs on SQLite always, and on PostgreSQL too with --pg (default: CITYTWIN_BENCH_PG or
CITYTWIN_TEST_PG). Each server is a separate process on 127.0.0.1; the devices are aiocoap
clients in this process. `--devices` lamps are enrolled, and each observes `/twin/desired`
over its own `coaps+tcp` connection with its own certificate. Then, timed:

* bulk: one `BulkUpdateDesired` whose selector matches every lamp; each device's delay is
  from the call's start to its notification carrying the new value;
* single: one `UpdateDesired` per device, `--concurrency` calls in flight; each device's
  delay is from the start of its own call to its notification.

Between the two the devices report the applied value back (untimed), as real lamps would, so
no twin stays PENDING and the reconciler's re-notifications do not run into the next phase.

The bare server holds one aiocoap `ObservableResource` that every device observes (each with
its own query, so that one device can be notified alone); a CoAP POST to `/push` changes the
value for all (`updated_state()`) or for one device and answers 2.04 at once. It runs behind
the same `start_tls_server` transport with the same TLS settings, so the rows say what
citytwin adds (gRPC, the transaction, the change feed, a database read per notification) to
pushing a notification over CoAP. The devices run in this one process on one core for both.

Under each row: the first device's delay, when the call returned (bulk) or the calls' rate
(single), the notifications per device received by the time the last device had its own (more
than 1.00 means duplicates, e.g. reconciler re-notifications), and the server's CPU time.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiocoap
import aiocoap.resource
import grpc
from aiocoap.numbers.codes import Code
from google.protobuf.struct_pb2 import Struct

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.devices import (
    JSON,
    REQUEST_TIMEOUT_SECONDS,
    BareServer,
    DeviceCredentials,
    LocalPki,
    Observer,
    bounded,
    close_devices,
    connect_devices,
    enroll_devices,
    percentile,
    process_cpu_seconds,
    raise_fd_limit,
    serve_bare,
)
from citytwin.v1 import twins_pb2, twins_pb2_grpc
from tests.conftest import Server, new_database, run_cli
from twin.coap_tls import client_ssl_context, device_client_context

# Devices registering their observation at once: enough to keep the server busy.
_OBSERVE_CONCURRENCY = 64
# A notification later than this counts as lost: the bench fails rather than waits for ever.
_NOTIFICATION_TIMEOUT_SECONDS = 120.0
# Brightness values of the two timed changes; the devices start at none (empty desired).
_BULK_VALUE = 41
_SINGLE_VALUE = 42


class BareDesired(aiocoap.resource.ObservableResource):  # type: ignore[misc]
    """One observable resource for every device; `?DEVICE` in the URI names the observer so
    that `/push` can notify one device alone, as citytwin does."""

    def __init__(self) -> None:
        super().__init__()
        self.everyone: int | None = None
        self.own: dict[str, int] = {}
        self.by_device: dict[str, Any] = {}

    async def add_observation(self, request: aiocoap.Message, observation: Any) -> None:
        """aiocoap's registration, plus the device's name for single notifications."""
        await super().add_observation(request, observation)
        self.by_device["&".join(request.opt.uri_query)] = observation

    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        """The device's desired document, in JSON as citytwin gives it by default."""
        device = "&".join(request.opt.uri_query)
        value = self.own.get(device, self.everyone)
        document = {} if value is None else {"brightness": value}
        return aiocoap.Message(
            code=Code.CONTENT, payload=json.dumps(document).encode(), content_format=JSON
        )


class Push(aiocoap.resource.Resource):  # type: ignore[misc]
    """`/push`: POST `{"brightness": N}` to change every device's value, with `"device":
    ID` to change one device's; the observers hear of it at once."""

    def __init__(self, desired: BareDesired) -> None:
        super().__init__()
        self.desired = desired

    async def render_post(self, request: aiocoap.Message) -> aiocoap.Message:
        """Change the value, trigger the notifications, answer 2.04."""
        order = json.loads(request.payload)
        device = order.get("device")
        if device is None:
            self.desired.everyone = order["brightness"]
            self.desired.own.clear()
            self.desired.updated_state()
        else:
            self.desired.own[device] = order["brightness"]
            self.desired.by_device[device].trigger()
        return aiocoap.Message(code=Code.CHANGED)


def bare_site() -> aiocoap.resource.Site:
    """The bare server's site."""
    desired = BareDesired()
    site = aiocoap.resource.Site()
    site.add_resource(["twin", "desired"], desired)
    site.add_resource(["push"], Push(desired))
    return site


@dataclass(frozen=True)
class Stack:
    """How to observe and change the desired state of one kind of server."""

    label: str
    trust_pem: bytes
    devices: list[DeviceCredentials]
    observe_uri: Callable[[DeviceCredentials], str]
    # (context of the change-maker, brightness) -> done
    change_all: Callable[[Any, int], Awaitable[None]]
    # (context of the change-maker, device, brightness) -> done
    change_one: Callable[[Any, DeviceCredentials, int], Awaitable[None]]
    # the server process, for its CPU time
    server_pid: int
    # after a timed change: what the devices do about it (untimed), e.g. report it applied
    settle: Callable[[list[aiocoap.Context], int], Awaitable[None]] | None = None


def summarise(label: str, delays: list[float], notes: str) -> None:
    """Print one row: p50, p99 and max delay in milliseconds, then `notes` below it."""
    delays = sorted(delays)
    print(
        f"{label:<50} p50 {statistics.median(delays) * 1000:7.1f} ms"
        f"   p99 {percentile(delays, 0.99) * 1000:7.1f} ms"
        f"   max {delays[-1] * 1000:7.1f} ms",
        flush=True,
    )
    print(f"{'':<50} first {delays[0] * 1000:.1f} ms; {notes}", flush=True)


async def measure(stack: Stack, maker: Any, concurrency: int) -> None:
    """Connect and observe with every device, then time a change to all and single changes;
    prints two rows."""
    contexts = await connect_devices(stack.trust_pem, stack.devices)
    observers = [Observer() for _ in stack.devices]
    try:
        started = time.perf_counter()

        def observe(index: int) -> Callable[[], Awaitable[None]]:
            return lambda: observers[index].start(
                contexts[index], stack.observe_uri(stack.devices[index])
            )

        await bounded(_OBSERVE_CONCURRENCY, [observe(i) for i in range(len(observers))])
        print(
            f"  ({len(observers)} devices connected and observing in"
            f" {time.perf_counter() - started:.1f} s)",
            flush=True,
        )
        # A full collection over the thousands of connection objects made so far takes ~0.1 s
        # and would land in some device's delay; nothing of them is garbage, so freeze them.
        gc.collect()
        gc.freeze()

        async def arrivals(value: int, marks: list[int]) -> list[float]:
            return list(
                await asyncio.wait_for(
                    asyncio.gather(
                        *(
                            o.arrival("brightness", value, after=m)
                            for o, m in zip(observers, marks, strict=True)
                        )
                    ),
                    _NOTIFICATION_TIMEOUT_SECONDS,
                )
            )

        def notifications_since(marks: list[int]) -> float:
            sent = sum(len(o.arrivals) - m for o, m in zip(observers, marks, strict=True))
            return sent / len(observers)

        def server_cpu(since: float | None) -> str:
            now = process_cpu_seconds(stack.server_pid)
            if since is None or now is None:
                return ""
            return f"; server CPU {(now - since) / len(observers) * 1000:.2f} ms per device"

        # All at once: one call, every device's delay from its start.
        marks = [len(o.arrivals) for o in observers]
        cpu = process_cpu_seconds(stack.server_pid)
        started = time.perf_counter()
        await stack.change_all(maker, _BULK_VALUE)
        returned = time.perf_counter() - started
        delays = [at - started for at in await arrivals(_BULK_VALUE, marks)]
        summarise(
            f"{stack.label}, all at once",
            delays,
            f"call returned after {returned * 1000:.0f} ms"
            f"; {notifications_since(marks):.2f} notifications/device{server_cpu(cpu)}",
        )
        if stack.settle is not None:
            await stack.settle(contexts, _BULK_VALUE)

        # One by one: each device's delay from the start of its own call.
        marks = [len(o.arrivals) for o in observers]
        starts: list[float] = [0.0] * len(observers)

        def change(index: int) -> Callable[[], Awaitable[None]]:
            async def call() -> None:
                starts[index] = time.perf_counter()
                await stack.change_one(maker, stack.devices[index], _SINGLE_VALUE)

            return call

        cpu = process_cpu_seconds(stack.server_pid)
        begun = time.perf_counter()
        await bounded(concurrency, [change(i) for i in range(len(observers))])
        calls = time.perf_counter() - begun
        arrived = await arrivals(_SINGLE_VALUE, marks)
        delays = [at - start for at, start in zip(arrived, starts, strict=True)]
        summarise(
            f"{stack.label}, one by one ({concurrency} in flight)",
            delays,
            f"{len(delays) / calls:.0f} calls/s"
            f"; {notifications_since(marks):.2f} notifications/device{server_cpu(cpu)}",
        )
        if stack.settle is not None:
            await stack.settle(contexts, _SINGLE_VALUE)
    finally:
        gc.unfreeze()
        for observer in observers:
            observer.stop()
        await close_devices(contexts)


def run_bare(args: argparse.Namespace) -> None:
    """The lower bound: a bare ObservableResource behind start_tls_server."""
    pki = LocalPki.create()
    devices = pki.devices(args.devices)
    with tempfile.TemporaryDirectory() as directory:
        pki.save(Path(directory))
        server = BareServer(__file__, "citytwin", Path(directory), 0)
        coaps = f"coaps+tcp://127.0.0.1:{server.port}"

        async def post(maker: aiocoap.Context, order: dict[str, object]) -> None:
            message = aiocoap.Message(
                code=aiocoap.POST,
                uri=f"{coaps}/push",
                payload=json.dumps(order).encode(),
                content_format=JSON,
            )
            response = await asyncio.wait_for(
                maker.request(message).response, REQUEST_TIMEOUT_SECONDS
            )
            if response.code != Code.CHANGED:
                raise RuntimeError(f"push refused: {response.code} {response.payload!r}")

        async def change_all(maker: Any, value: int) -> None:
            await post(maker, {"brightness": value})

        async def change_one(maker: Any, device: DeviceCredentials, value: int) -> None:
            await post(maker, {"device": device.device_id, "brightness": value})

        stack = Stack(
            "bare ObservableResource",
            pki.trust_pem,
            devices,
            lambda d: f"{coaps}/twin/desired?{d.device_id}",
            change_all,
            change_one,
            server.pid,
        )

        async def run() -> None:
            # The change-maker is a client of its own, as the gRPC caller is for citytwin.
            maker = await device_client_context(client_ssl_context(pki.trust_pem))
            try:
                await post(maker, {"brightness": 0})  # opens its connection, untimed
                await measure(stack, maker, args.concurrency)
            finally:
                await maker.shutdown()

        try:
            asyncio.run(run())
        finally:
            server.stop()


def run_backend(backend: str, args: argparse.Namespace) -> None:
    """Start a citytwin server on `backend`, enroll and observe, change through gRPC."""
    district = "push"
    with tempfile.TemporaryDirectory() as home:
        db = new_database(backend, Path(home))
        token = run_cli(db, "token", "create", "--role", "admin").stdout.strip()
        # Longer than any bench: an observer waiting quietly must not be closed as idle.
        server = Server(db, extra_env={"CITYTWIN_COAPS_IDLE_TIMEOUT": "3600"}).start()
        try:
            trust = run_cli(db, "ca", "show", "--pem").stdout.encode()
            coaps = f"coaps+tcp://127.0.0.1:{server.coaps_port}"
            devices = enroll_devices(server.address, coaps, token, trust, args.devices, district)
            assert server.process is not None
            metadata = (("authorization", f"Bearer {token}"),)

            def patch(value: int) -> Struct:
                struct = Struct()
                struct.update({"brightness": value})
                return struct

            async def change_all(stub: Any, value: int) -> None:
                response = await stub.BulkUpdateDesired(
                    twins_pb2.BulkUpdateDesiredRequest(
                        filter=f"kind=lamp,district={district}", patch=patch(value)
                    ),
                    metadata=metadata,
                    timeout=_NOTIFICATION_TIMEOUT_SECONDS,
                )
                if response.changed_count != len(devices):
                    raise RuntimeError(f"bulk update changed {response.changed_count} twins")

            async def change_one(stub: Any, device: DeviceCredentials, value: int) -> None:
                await stub.UpdateDesired(
                    twins_pb2.UpdateDesiredRequest(
                        name=f"devices/{device.device_id}/twin", patch=patch(value)
                    ),
                    metadata=metadata,
                    timeout=_NOTIFICATION_TIMEOUT_SECONDS,
                )

            async def settle(contexts: list[aiocoap.Context], value: int) -> None:
                # Devices apply the change and say so; an in-sync twin is not re-notified.
                body = json.dumps({"brightness": value}).encode()

                def report(context: aiocoap.Context) -> Callable[[], Awaitable[None]]:
                    async def post() -> None:
                        message = aiocoap.Message(
                            code=aiocoap.POST,
                            uri=f"{coaps}/twin/reported",
                            payload=body,
                            content_format=JSON,
                        )
                        response = await asyncio.wait_for(
                            context.request(message).response, REQUEST_TIMEOUT_SECONDS
                        )
                        if response.code != Code.CHANGED:
                            raise RuntimeError(f"report refused: {response.code}")

                    return post

                await bounded(_OBSERVE_CONCURRENCY, [report(c) for c in contexts])

            stack = Stack(
                f"citytwin on {backend}",
                trust,
                devices,
                lambda d: f"{coaps}/twin/desired",
                change_all,
                change_one,
                server.process.pid,
                settle,
            )

            async def run() -> None:
                async with grpc.aio.insecure_channel(server.address) as channel:
                    await measure(stack, twins_pb2_grpc.TwinServiceStub(channel), args.concurrency)

            asyncio.run(run())
        finally:
            server.stop()
            db.drop()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--devices", type=int, default=1000, help="observing devices")
    parser.add_argument(
        "--concurrency", type=int, default=16, help="single changes in flight at once"
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
    print(
        f"{args.devices} devices observing /twin/desired, each its own coaps+tcp connection;"
        f" delay from the change's start to each device's notification;"
        f" {os.cpu_count()}-core machine",
        flush=True,
    )
    run_bare(args)

    import tests.conftest as harness

    # The harness reads the PostgreSQL DSN once at import; the bench sets it from --pg.
    harness.PG_DSN = args.pg
    for backend in ["sqlite", "postgres"] if args.pg else ["sqlite"]:
        run_backend(backend, args)


if __name__ == "__main__":
    main()
