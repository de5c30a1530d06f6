"""Benchmark: EST-coaps enrollments per second end to end, against the bare rate of signing a
device certificate with `cryptography`, measured in the same run.

    .venv/bin/python bench/enroll.py [--enrollments 300] [--clients 8] [--pg DSN]

Runs on SQLite always, and on PostgreSQL too with --pg (default: CITYTWIN_BENCH_PG or
CITYTWIN_TEST_PG). Each server is a separate `citytwin serve` process on 127.0.0.1; the devices
are aiocoap clients in this process. The enrollments are created through gRPC first (not
timed); then `--clients` concurrent devices each POST a DER CSR carrying their code to
`coaps+tcp .../.well-known/est/sen`, wait for the 2.04 and parse the certificate out of the
certs-only PKCS#7 answer. That is timed twice, with fresh enrollments each time:

* new connection: every enrollment opens its own TLS connection (handshake included), as
  real devices do, each enrolling once;
* shared: each client keeps one TLS connection for all its enrollments, so the rate is
  enrollment work alone.

The bare rows sign the same kind of certificate in this process on one core: just
`issue_device_certificate` (plus DER encoding), and with `inspect_csr` before it (parsing and
verifying the CSR, as the server must). The ratio says how much of the signing rate survives
TLS, CoAP, the one-time-code check and the database transaction.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import aiocoap
import grpc
from aiocoap.numbers.codes import Code
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs7

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from citytwin.v1 import devices_pb2, provisioning_pb2, provisioning_pb2_grpc
from provisioning.certificate_authority import create_fleet_ca, issue_device_certificate
from provisioning.csr_policy import inspect_csr
from tests.conftest import Server, new_database, run_cli
from twin.coap_tls import client_ssl_context, device_client_context

PKCS10 = 286
# Beyond this many CreateEnrollment calls in flight the server only queues them.
_SETUP_CONCURRENCY = 16
# Same bound as the tests' request helper: an enrollment that takes longer is a failure.
_REQUEST_TIMEOUT_SECONDS = 15.0


@dataclass(frozen=True)
class Device:
    """One device to enroll: its serial number and a DER CSR carrying its enrollment code."""

    serial: str
    csr: bytes


@dataclass(frozen=True)
class Result:
    """One row of the table."""

    rate: float  # per second
    p50: float  # milliseconds
    p99: float  # milliseconds


def make_csr(serial: str, code: str) -> bytes:
    """A P-256 key and a CSR for it, as a device makes them (CN, serialNumber, code)."""
    from twin.simulator.devices import make_csr as device_csr
    from twin.simulator.devices import new_device_key

    return device_csr(new_device_key(), serial, code, common_name="lamp")


def process_cpu_seconds(pid: int) -> float | None:
    """CPU time (user + system, all threads) a process has used so far; None off Linux."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    # utime and stime are fields 14 and 15 of stat(5); fields[0] here is field 3.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def summarise(label: str, latencies: list[float], seconds: float) -> Result:
    """Print one table row (rate, p50, p99) and return it."""
    latencies = sorted(latencies)
    result = Result(
        rate=len(latencies) / seconds,
        p50=statistics.median(latencies) * 1000,
        p99=latencies[max(0, int(len(latencies) * 0.99) - 1)] * 1000,
    )
    print(
        f"{label:<46} {result.rate:>8.0f}/s   p50 {result.p50:7.2f} ms   p99 {result.p99:7.2f} ms",
        flush=True,
    )
    return result


def bare_signing(seconds: float) -> tuple[Result, Result]:
    """Sign device certificates in this process, single-threaded, for `seconds` each way:
    (sign only, check CSR + sign)."""
    ca, _root_key = create_fleet_ca("bench fleet")
    der = make_csr("SN-bench", "0000-0000-0000-0000")
    facts = inspect_csr(der)

    def sign_only(index: int) -> None:
        cert = issue_device_certificate(
            ca, facts, device_id=f"d-{index:08d}", hardware_serial="SN-bench"
        )
        cert.public_bytes(serialization.Encoding.DER)

    def check_and_sign(index: int) -> None:
        cert = issue_device_certificate(
            ca, inspect_csr(der), device_id=f"d-{index:08d}", hardware_serial="SN-bench"
        )
        cert.public_bytes(serialization.Encoding.DER)

    def measure(label: str, work: Callable[[int], None]) -> Result:
        latencies: list[float] = []
        started = time.perf_counter()
        deadline = started + seconds
        while time.perf_counter() < deadline:
            begun = time.perf_counter()
            work(len(latencies))
            latencies.append(time.perf_counter() - begun)
        return summarise(label, latencies, time.perf_counter() - started)

    return (
        measure("bare cryptography: sign", sign_only),
        measure("bare cryptography: check CSR + sign", check_and_sign),
    )


async def create_enrollments(address: str, token: str, serials: list[str]) -> list[str]:
    """Register a lamp with an enrollment per serial (through gRPC, as installers do); the
    codes, in the same order."""
    metadata = (("authorization", f"Bearer {token}"),)
    limit = asyncio.Semaphore(_SETUP_CONCURRENCY)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = provisioning_pb2_grpc.ProvisioningServiceStub(channel)

        async def create(serial: str) -> str:
            async with limit:
                response = await stub.CreateEnrollment(
                    provisioning_pb2.CreateEnrollmentRequest(
                        device=devices_pb2.Device(
                            kind=devices_pb2.LAMP,
                            model="lamp-led-dimmable",
                            serial_number=serial,
                            labels={"district": "bench"},
                        )
                    ),
                    metadata=metadata,
                    timeout=30,
                )
            return str(response.enrollment_code)

        return list(await asyncio.gather(*(create(s) for s in serials)))


async def enroll_all(
    uri: str, trust_pem: bytes, devices: list[Device], clients: int, shared: bool
) -> tuple[list[float], float]:
    """Enroll every device from `clients` concurrent workers; (latencies, wall seconds)."""
    tls = client_ssl_context(trust_pem)  # loading the trust store once is the device's business
    queue: asyncio.Queue[Device] = asyncio.Queue()
    for device in devices:
        queue.put_nowait(device)
    latencies: list[float] = []
    closing: list[asyncio.Task[None]] = []

    async def enroll(context: aiocoap.Context, device: Device) -> None:
        message = aiocoap.Message(code=aiocoap.POST, uri=uri, payload=device.csr)
        message.opt.content_format = PKCS10
        response = await asyncio.wait_for(
            context.request(message).response, _REQUEST_TIMEOUT_SECONDS
        )
        if response.code != Code.CHANGED:
            raise RuntimeError(f"{device.serial}: {response.code} {response.payload!r}")
        (cert,) = pkcs7.load_der_pkcs7_certificates(response.payload)
        if cert.subject.get_attributes_for_oid(x509.NameOID.SERIAL_NUMBER)[0].value != (
            device.serial
        ):
            raise RuntimeError(f"{device.serial}: certificate for {cert.subject}")

    async def worker() -> None:
        shared_context = await device_client_context(tls) if shared else None
        try:
            while not queue.empty():
                device = queue.get_nowait()
                started = time.perf_counter()
                # Without sharing, connecting is part of the device's enrollment: timed too.
                if shared_context is not None:
                    context = shared_context
                else:
                    context = await device_client_context(tls)
                await enroll(context, device)
                latencies.append(time.perf_counter() - started)
                if shared_context is None:
                    # aiocoap's shutdown waits for the peer to close; a device that hung up
                    # does not wait, so the next enrollment need not either.
                    closing.append(asyncio.create_task(context.shutdown()))
        finally:
            if shared_context is not None:
                await shared_context.shutdown()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    elapsed = time.perf_counter() - started
    await asyncio.gather(*closing)
    return latencies, elapsed


def run_backend(backend: str, args: argparse.Namespace, bare: Result) -> None:
    """Start a server on `backend`, enroll through it both ways and print the rows."""
    with tempfile.TemporaryDirectory() as home:
        db = new_database(backend, Path(home))
        token = run_cli(db, "token", "create", "--role", "admin").stdout.strip()
        server = Server(db).start()
        try:
            # The fleet CA exists once the server has started.
            trust = run_cli(db, "ca", "show", "--pem").stdout.encode()
            uri = f"coaps+tcp://127.0.0.1:{server.coaps_port}/.well-known/est/sen"
            for shared in (False, True):
                serials = [
                    f"SN-{backend}-{'s' if shared else 'n'}-{i:05d}"
                    for i in range(args.enrollments)
                ]
                codes = asyncio.run(create_enrollments(server.address, token, serials))
                devices = [Device(s, make_csr(s, c)) for s, c in zip(serials, codes, strict=True)]
                assert server.process is not None
                cpu_before = process_cpu_seconds(server.process.pid)
                latencies, seconds = asyncio.run(
                    enroll_all(uri, trust, devices, args.clients, shared)
                )
                cpu_after = process_cpu_seconds(server.process.pid)
                how = "one connection per client" if shared else "new connection each"
                result = summarise(f"citytwin {backend}, {how}", latencies, seconds)
                print(
                    f"{'':<46} ratio to bare sign: throughput {result.rate / bare.rate:.3f}x,"
                    f" p50 {result.p50 / bare.p50:.0f}x"
                )
                # Whether the server was the bottleneck: its CPU share of the timed phase.
                if cpu_before is not None and cpu_after is not None:
                    used = cpu_after - cpu_before
                    print(
                        f"{'':<46} server CPU {used / len(latencies) * 1000:.1f} ms"
                        f" per enrollment, {used / seconds:.0%} of a core"
                    )
        finally:
            server.stop()
            db.drop()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--enrollments", type=int, default=300, help="per connection mode")
    parser.add_argument("--clients", type=int, default=8, help="concurrent devices")
    parser.add_argument("--bare-seconds", type=float, default=2.0)
    parser.add_argument(
        "--pg",
        default=os.environ.get("CITYTWIN_BENCH_PG") or os.environ.get("CITYTWIN_TEST_PG", ""),
        metavar="DSN",
        help="also run on PostgreSQL (a database per run is created from this DSN)",
    )
    args = parser.parse_args()

    print(
        f"{args.enrollments} enrollments per row, {args.clients} concurrent clients,"
        f" {os.cpu_count()}-core machine (server: one process; bare: one core)"
    )
    bare, _ = bare_signing(args.bare_seconds)

    import tests.conftest as harness

    # The harness reads the PostgreSQL DSN once at import; the bench sets it from --pg.
    harness.PG_DSN = args.pg
    for backend in ["sqlite", "postgres"] if args.pg else ["sqlite"]:
        run_backend(backend, args, bare)


if __name__ == "__main__":
    main()
