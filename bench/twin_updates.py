"""Benchmark: UpdateDesired throughput and latency through gRPC, against a bare grpc.aio
unary handler measured in the same run.

    .venv/bin/python bench/twin_updates.py [--seconds 10] [--clients 16] [--devices 200]

Runs on SQLite always and on PostgreSQL when CITYTWIN_BENCH_PG (or CITYTWIN_TEST_PG) holds a
DSN. Every server is a separate process on 127.0.0.1; the load comes from this process.
The bare server answers the same RPC with a constant Twin and touches no database, so the
ratio says what citytwin's validation, transaction and change feed cost on top of gRPC.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.struct_pb2 import Struct

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from citytwin.v1 import devices_pb2, twins_pb2, twins_pb2_grpc
from tests.conftest import Server, free_port, new_database, run_cli


class BareTwinService(twins_pb2_grpc.TwinServiceServicer):
    """The same RPC with nothing behind it."""

    async def UpdateDesired(self, request: Any, context: Any) -> twins_pb2.Twin:
        return twins_pb2.Twin(name=request.name, desired=request.patch, version=1)


async def run_bare_server(port: int) -> None:
    server = grpc.aio.server()
    # Only UpdateDesired is served; the other methods answer UNIMPLEMENTED as generated.
    twins_pb2_grpc.add_TwinServiceServicer_to_server(BareTwinService(), server)  # type: ignore[abstract]
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


async def load(
    address: str, token: str, names: list[str], clients: int, seconds: float
) -> tuple[int, list[float]]:
    """Drive UpdateDesired from `clients` concurrent callers; returns calls and latencies."""
    latencies: list[float] = []
    metadata = (("authorization", f"Bearer {token}"),)
    deadline = time.perf_counter() + seconds
    async with grpc.aio.insecure_channel(address) as channel:
        stub = twins_pb2_grpc.TwinServiceStub(channel)

        async def client(index: int) -> None:
            level = 0
            # Each client owns its devices, so calls contend on the database, not on rows.
            mine = names[index::clients]
            while time.perf_counter() < deadline:
                level = (level + 1) % 101
                patch = Struct()
                patch.update({"brightness": level})
                started = time.perf_counter()
                await stub.UpdateDesired(
                    twins_pb2.UpdateDesiredRequest(name=mine[level % len(mine)], patch=patch),
                    metadata=metadata,
                    timeout=30,
                )
                latencies.append(time.perf_counter() - started)

        await asyncio.gather(*(client(i) for i in range(clients)))
    return len(latencies), latencies


def summarise(label: str, calls: int, latencies: list[float], seconds: float) -> dict[str, float]:
    latencies.sort()
    result = {
        "rate": calls / seconds,
        "p50": statistics.median(latencies) * 1000,
        "p99": latencies[int(len(latencies) * 0.99) - 1] * 1000,
    }
    print(
        f"{label:<22} {result['rate']:>9.0f}/s   p50 {result['p50']:7.2f} ms"
        f"   p99 {result['p99']:7.2f} ms",
        flush=True,
    )
    return result


def create_devices(address: str, token: str, count: int) -> list[str]:
    from citytwin.v1 import devices_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        stub = devices_pb2_grpc.DeviceServiceStub(channel)
        for i in range(count):
            stub.CreateDevice(
                devices_pb2.CreateDeviceRequest(
                    device_id=f"bench-{i:05d}",
                    device=devices_pb2.Device(
                        kind=devices_pb2.LAMP,
                        model="lamp-led-dimmable",
                        serial_number=f"bench-sn-{i}",
                        labels={"district": "bench"},
                    ),
                ),
                metadata=(("authorization", f"Bearer {token}"),),
            )
    return [f"devices/bench-{i:05d}" for i in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--devices", type=int, default=200)
    parser.add_argument("--bare-server", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare_server:
        asyncio.run(run_bare_server(args.bare_server))
        return

    import subprocess

    port = free_port()
    bare = subprocess.Popen([sys.executable, __file__, "--bare-server", str(port)])
    time.sleep(1.5)
    try:
        print(f"{args.clients} concurrent clients, {args.seconds:.0f} s per run, 2-core machine")
        names = [f"devices/bench-{i:05d}" for i in range(args.devices)]
        bare_result = summarise(
            "bare grpc.aio unary",
            *asyncio.run(load(f"127.0.0.1:{port}", "x", names, args.clients, args.seconds)),
            args.seconds,
        )
    finally:
        bare.terminate()
        bare.wait()

    pg = os.environ.get("CITYTWIN_BENCH_PG") or os.environ.get("CITYTWIN_TEST_PG")
    backends = ["sqlite", "postgres"] if pg else ["sqlite"]
    if pg:
        os.environ["CITYTWIN_TEST_PG"] = pg
    import tests.conftest as harness

    harness.PG_DSN = pg or ""
    for backend in backends:
        with tempfile.TemporaryDirectory() as home:
            db = new_database(backend, Path(home))
            token = run_cli(db, "token", "create", "--role", "admin").stdout.strip()
            server = Server(db).start()
            try:
                names = create_devices(server.address, token, args.devices)
                result = summarise(
                    f"citytwin on {backend}",
                    *asyncio.run(load(server.address, token, names, args.clients, args.seconds)),
                    args.seconds,
                )
                ratio = result["rate"] / bare_result["rate"]
                print(
                    f"{'':<22} ratio to bare: throughput {ratio:.2f}x,"
                    f" p50 {result['p50'] / bare_result['p50']:.1f}x,"
                    f" p99 {result['p99'] / bare_result['p99']:.1f}x"
                )
            finally:
                server.stop()
                db.drop()


if __name__ == "__main__":
    main()
