"""What the device benches share: many devices, each with its own certificate and its own
`coaps+tcp` connection, against a `citytwin serve` process or a bare aiocoap server process.

* `enroll_devices`: register lamps through gRPC and enroll them over EST-coaps as
  bench/enroll.py does (a few shared TLS connections, CSRs carrying one-time codes), keeping
  each device's key and certificate so it can connect as itself afterwards.
* `LocalPki`: a fleet CA of the bench's own, a server certificate and device certificates
  signed in-process, for the bare servers (which have no enrollment); `server_ssl_context`
  gives them exactly the TLS settings citytwin uses.
* `connect_devices`: one aiocoap client context per device, so one TLS connection each.
* `Observer`: one observation, with the arrival time of every notification.
* `BareServer`: a bare server as a child process (the bench script re-run with
  `--bare-server`), started and stopped like `tests.conftest.Server`.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import ssl
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiocoap
import aiocoap.resource
import grpc
from aiocoap.numbers.codes import Code
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import AttributeOID, NameOID

from citytwin.v1 import devices_pb2, provisioning_pb2, provisioning_pb2_grpc
from provisioning.certificate_authority import (
    CertificateAuthority,
    create_fleet_ca,
    issue_device_certificate,
)
from provisioning.csr_policy import CsrFacts
from provisioning.server_identity import issue_server_identity
from twin.coap_tls import (
    client_ssl_context,
    device_client_context,
    server_ssl_context,
    start_tls_server,
)

PKCS10 = 286
JSON = 50
CBOR = 60
# Same bound as the tests' request helper: a request that takes longer is a failure.
REQUEST_TIMEOUT_SECONDS = 15.0
# Beyond this many gRPC calls in flight the server only queues them (bench/enroll.py).
_SETUP_CONCURRENCY = 16
# Concurrent EST enrollments: the server is CPU-bound beyond a handful (bench/enroll.py).
_ENROLL_CLIENTS = 16
# File descriptors the bench needs besides one per device connection (stdio, the loop's
# self-pipe, gRPC channels, sqlite, pipes to child processes).
_SPARE_FDS = 256

T = TypeVar("T")


@dataclass(frozen=True)
class DeviceCredentials:
    """What a device presents on `coaps+tcp`: its id, certificate and key (PEM)."""

    device_id: str
    cert_pem: bytes
    key_pem: bytes


def raise_fd_limit(connections: int) -> None:
    """Raise this process's open-file limit (children inherit it: the servers started from
    here) to what `connections` sockets need; SystemExit if the hard limit is too low."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = connections + _SPARE_FDS
    if soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise SystemExit(
            f"{connections} connections need {needed} open files, but the hard limit is {hard};"
            " raise it (ulimit -Hn) or ask for fewer devices"
        )
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def process_cpu_seconds(pid: int) -> float | None:
    """CPU time (user + system, all threads) a process has used so far; None off Linux."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    # utime and stime are fields 14 and 15 of stat(5); fields[0] here is field 3.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_rss_kib(pid: int) -> int:
    """Resident memory of a process in KiB (VmRSS of /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])  # always given in kB
    raise RuntimeError(f"no VmRSS for process {pid}")


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """The value below which `fraction` of `sorted_values` lie (nearest rank)."""
    return sorted_values[max(0, int(len(sorted_values) * fraction + 0.5) - 1)]


async def bounded(concurrency: int, jobs: Sequence[Callable[[], Awaitable[T]]]) -> list[T]:
    """Run `jobs` with at most `concurrency` in flight; their results in order."""
    limit = asyncio.Semaphore(concurrency)

    async def run(job: Callable[[], Awaitable[T]]) -> T:
        async with limit:
            return await job()

    return list(await asyncio.gather(*(run(job) for job in jobs)))


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _csr(key: ec.EllipticCurvePrivateKey, serial: str, code: str) -> bytes:
    """A DER CSR as a lamp makes it: CN, serialNumber, the code as challengePassword."""
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, "lamp"),
            x509.NameAttribute(NameOID.SERIAL_NUMBER, serial),
        ]
    )
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(subject)
        .add_attribute(AttributeOID.CHALLENGE_PASSWORD, code.encode())
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.DER)
    )


async def _create_enrollments(
    address: str, token: str, serials: list[str], district: str
) -> list[tuple[str, str]]:
    """Register a lamp with an enrollment per serial through gRPC, as installers do; the
    (device id, code) of each, in order."""
    metadata = (("authorization", f"Bearer {token}"),)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = provisioning_pb2_grpc.ProvisioningServiceStub(channel)

        def create(serial: str) -> Callable[[], Awaitable[tuple[str, str]]]:
            async def call() -> tuple[str, str]:
                response = await stub.CreateEnrollment(
                    provisioning_pb2.CreateEnrollmentRequest(
                        device=devices_pb2.Device(
                            kind=devices_pb2.LAMP,
                            model="lamp-led-dimmable",
                            serial_number=serial,
                            labels={"district": district},
                        )
                    ),
                    metadata=metadata,
                    timeout=60,
                )
                return (
                    response.device.name.removeprefix("devices/"),
                    str(response.enrollment_code),
                )

            return call

        return await bounded(_SETUP_CONCURRENCY, [create(s) for s in serials])


async def _enroll(
    coaps: str, trust_pem: bytes, serials: list[str], enrollments: list[tuple[str, str]]
) -> list[DeviceCredentials]:
    """EST simple enrollment of every device over a few shared connections (anonymous TLS,
    the code authenticates), keeping each device's key and certificate."""
    uri = f"{coaps}/.well-known/est/sen"
    tls = client_ssl_context(trust_pem)
    contexts = [await device_client_context(tls) for _ in range(_ENROLL_CLIENTS)]
    credentials: list[DeviceCredentials | None] = [None] * len(serials)
    next_index = 0

    async def worker(context: aiocoap.Context) -> None:
        nonlocal next_index
        while next_index < len(serials):
            index = next_index
            next_index += 1
            device_id, code = enrollments[index]
            key = ec.generate_private_key(ec.SECP256R1())
            message = aiocoap.Message(
                code=aiocoap.POST, uri=uri, payload=_csr(key, serials[index], code)
            )
            message.opt.content_format = PKCS10
            response = await asyncio.wait_for(
                context.request(message).response, REQUEST_TIMEOUT_SECONDS
            )
            if response.code != Code.CHANGED:
                raise RuntimeError(f"{serials[index]}: {response.code} {response.payload!r}")
            (cert,) = pkcs7.load_der_pkcs7_certificates(response.payload)
            credentials[index] = DeviceCredentials(
                device_id, cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)
            )

    try:
        await asyncio.gather(*(worker(c) for c in contexts))
    finally:
        await asyncio.gather(*(c.shutdown() for c in contexts))
    return [c for c in credentials if c is not None]


def enroll_devices(
    grpc_address: str, coaps: str, token: str, trust_pem: bytes, count: int, district: str
) -> list[DeviceCredentials]:
    """`count` lamps labelled `district=DISTRICT`, registered and enrolled on a running
    server; their credentials. Prints how long it took, since thousands take a while."""
    started = time.perf_counter()
    serials = [f"SN-{district}-{i:05d}" for i in range(count)]
    enrollments = asyncio.run(_create_enrollments(grpc_address, token, serials, district))
    credentials = asyncio.run(_enroll(coaps, trust_pem, serials, enrollments))
    seconds = time.perf_counter() - started
    print(f"  ({count} devices registered and enrolled in {seconds:.1f} s)", flush=True)
    return credentials


@dataclass(frozen=True)
class LocalPki:
    """A fleet CA of the bench's own, for bare servers: the server's certificate chain and
    key, and what clients trust (the issuing CA and root, as citytwin's `crts` gives them)."""

    ca: CertificateAuthority
    server_chain_pem: bytes
    server_key_pem: bytes

    @classmethod
    def create(cls) -> LocalPki:
        """A new CA and a server certificate for 127.0.0.1."""
        ca, _root_key = create_fleet_ca("bench fleet")
        identity = issue_server_identity(ca, ["127.0.0.1"])
        return cls(ca, identity.chain_pem, identity.key_pem)

    @property
    def trust_pem(self) -> bytes:
        """The CA certificates (issuing, root) clients trust and the server accepts."""
        return self.ca.chain_pem()

    def devices(self, count: int) -> list[DeviceCredentials]:
        """`count` device certificates signed here, each for a new P-256 key."""
        credentials = []
        for i in range(count):
            key = ec.generate_private_key(ec.SECP256R1())
            # The CA only takes the key from a CSR: no need to make and check one here.
            facts = CsrFacts(key.public_key(), "EC P-256", f"SN-bare-{i}", None, None)
            cert = issue_device_certificate(
                self.ca, facts, device_id=f"bare-{i:05d}", hardware_serial=f"SN-bare-{i}"
            )
            credentials.append(
                DeviceCredentials(
                    f"bare-{i:05d}", cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)
                )
            )
        return credentials

    def save(self, directory: Path) -> None:
        """Write what a bare server process needs (see `load_server_ssl_context`)."""
        (directory / "server-chain.pem").write_bytes(self.server_chain_pem)
        (directory / "server-key.pem").write_bytes(self.server_key_pem)
        (directory / "client-ca.pem").write_bytes(self.trust_pem)


def load_server_ssl_context(directory: Path) -> ssl.SSLContext:
    """The TLS server context of a bare server, from what `LocalPki.save` wrote: citytwin's own
    `server_ssl_context`, so the handshake and its settings are the same as the server's."""
    return server_ssl_context(
        (directory / "server-chain.pem").read_bytes(),
        (directory / "server-key.pem").read_bytes(),
        [(directory / "client-ca.pem").read_bytes()],
    )


async def serve_bare(
    site: aiocoap.resource.Site, directory: Path, transport: str, port: int = 0
) -> None:
    """Serve `site` on 127.0.0.1 for ever, with TLS credentials from `directory`.

    `transport` "citytwin" uses `start_tls_server` (what `citytwin serve` uses: one read
    buffer per listener, connection cap, idle timeout); "aiocoap" uses aiocoap's own
    `tlsserver`, which binds the given port plus one (COAPS_PORT - COAP_PORT), hence
    `port - 1`. Prints "ready PORT" once listening, which `BareServer` waits for.
    """
    tls = load_server_ssl_context(directory)
    if transport == "aiocoap":
        await aiocoap.Context.create_server_context(
            site, bind=("127.0.0.1", port - 1), transports=["tlsserver"], _ssl_context=tls
        )
    else:
        # No UDP: the context exists to carry the TLS transport.
        context = await aiocoap.Context.create_server_context(site, transports=[])
        listener = await start_tls_server(
            context,
            "127.0.0.1",
            port,
            tls,
            max_connections=100_000,
            # Longer than any bench: an idle observer must not be closed mid-measurement.
            idle_timeout=3600.0,
        )
        port = listener.port
    print(f"ready {port}", flush=True)
    await asyncio.Event().wait()


class BareServer:
    """A bare server process: `script --bare-server TRANSPORT --pki DIR --port PORT [extra]`,
    which must call `serve_bare`."""

    def __init__(
        self, script: str, transport: str, pki_dir: Path, port: int, extra: Sequence[str] = ()
    ) -> None:
        self.process = subprocess.Popen(
            [
                sys.executable,
                script,
                "--bare-server",
                transport,
                "--pki",
                str(pki_dir),
                "--port",
                str(port),
                *extra,
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line.startswith("ready "):
            self.stop()
            raise RuntimeError(f"bare server did not start: {line!r}")
        self.port = int(line.split()[1])

    @property
    def pid(self) -> int:
        """The server's process id."""
        return self.process.pid

    def stop(self) -> None:
        """Terminate the server and wait for it."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


async def connect_devices(
    trust_pem: bytes, credentials: Sequence[DeviceCredentials]
) -> list[aiocoap.Context]:
    """An aiocoap client context per device, presenting its certificate. aiocoap keeps one
    connection per context and server, so each device gets its own TLS connection (opened by
    its first request)."""
    contexts = []
    for device in credentials:
        tls = client_ssl_context(trust_pem, cert_pem=device.cert_pem, key_pem=device.key_pem)
        contexts.append(await device_client_context(tls))
    return contexts


async def close_devices(contexts: Sequence[aiocoap.Context]) -> None:
    """Shut every client context down (best after the server has gone: aiocoap's shutdown
    then need not wait for the peer to close)."""
    await asyncio.gather(*(c.shutdown() for c in contexts), return_exceptions=True)


class Observer:
    """One observation (RFC 7641) by one device, keeping every notification with the time
    it arrived here (`time.perf_counter`)."""

    def __init__(self) -> None:
        self.arrivals: list[tuple[float, bytes]] = []
        self.failure: BaseException | None = None
        self._arrived = asyncio.Event()
        self._request: Any = None
        self._follower: asyncio.Task[None] | None = None

    async def start(self, context: aiocoap.Context, uri: str) -> None:
        """Register the observation and wait for the first answer (a 2.05 Content)."""
        self._request = context.request(aiocoap.Message(code=aiocoap.GET, uri=uri, observe=0))
        first = await asyncio.wait_for(self._request.response, REQUEST_TIMEOUT_SECONDS)
        if first.code != Code.CONTENT:
            raise RuntimeError(f"{uri}: {first.code} {first.payload!r}")
        # One iterator for the observation's whole life: aiocoap starts a new iterator at the
        # latest notification, so a second one could report a notification twice.
        self._follower = asyncio.create_task(self._follow(aiter(self._request.observation)))

    async def _follow(self, notifications: Any) -> None:
        # aiocoap's iterator has __anext__ but no __aiter__, so no `async for` over it.
        try:
            while True:
                notification = await anext(notifications)
                self.arrivals.append((time.perf_counter(), notification.payload))
                self._arrived.set()
        except StopAsyncIteration:  # the server ended the observation
            self.failure = RuntimeError("observation ended by the server")
            self._arrived.set()
        except Exception as failure:  # the observation ended with an error
            self.failure = failure
            self._arrived.set()

    async def arrival(self, key: str, value: object, after: int = 0) -> float:
        """When the first notification from `arrivals[after]` on whose JSON body has `key`
        equal to `value` arrived; waits for it."""
        index = after
        while True:
            while index < len(self.arrivals):
                at, payload = self.arrivals[index]
                index += 1
                if json.loads(payload).get(key) == value:
                    return at
            if self.failure is not None:
                raise RuntimeError(f"observation failed: {self.failure!r}")
            self._arrived.clear()
            await self._arrived.wait()

    def stop(self) -> None:
        """Stop following (the connection's end cancels the observation on the server)."""
        if self._follower is not None:
            self._follower.cancel()
        if self._request is not None:
            self._request.observation.cancel()
