"""CoAP over TLS (`twin.coap_tls`) with real aiocoap clients and raw TLS sockets on 127.0.0.1
(and ::1): client certificates reaching resources, untrusted and newly trusted CAs, the
connection cap, the handshake cap, the idle timeout, exact port binding, peer addresses, the
read buffer the connections share, one session ticket per handshake, a lost connection's
requests ended without visiting any other's, and shutdown. The TLS stream underneath has its
own tests (test_tls_stream.py: back-pressure, closing, timeouts, no spinning).

Client recipes (aiocoap 0.4.17), for tests that talk `coaps+tcp` to the service:

* Trusting the server's CA, no client certificate, with aiocoap's own credentials. `certfile`
  names the CA file (it becomes `cafile`, not a client certificate), and the key must be the
  exact `coaps+tcp://HOST:PORT/*` of the URIs requested: `coaps+tcp://*` or a key without
  the port is never consulted, and the client then falls back to the system trust store::

      client = await aiocoap.Context.create_client_context(transports=["tlsclient"])
      client.client_credentials.load_from_dict(
          {f"coaps+tcp://127.0.0.1:{port}/*": {"tlscert": {"certfile": "/path/ca.pem"}}}
      )
      await client.request(
          aiocoap.Message(code=aiocoap.GET, uri=f"coaps+tcp://127.0.0.1:{port}/who")
      ).response
      await client.shutdown()

* Presenting a client certificate (aiocoap's credentials have no way to): build the SSL
  context yourself and hand it to every TLS connection of a client context::

      from twin.coap_tls import client_ssl_context, device_client_context

      tls = client_ssl_context(ca_chain_pem, cert_pem=device_cert_pem, key_pem=device_key_pem)
      client = await device_client_context(tls)  # coaps+tcp only; shut it down when done

  `client_ssl_context(ca_chain_pem)` alone gives the same without a client certificate. The
  server certificate must name the host of the URI (an IP SAN for 127.0.0.1). One client
  context keeps one connection per host and port: use a new one for a new handshake.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import socket
import ssl
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiocoap
import aiocoap.error
import aiocoap.resource
import pytest
from aiocoap.numbers.codes import Code
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from provisioning.certificate_authority import (
    CertificateAuthority,
    create_fleet_ca,
    issue_device_certificate,
    issue_server_certificate,
)
from provisioning.csr_policy import inspect_csr
from tests.coap_devices import read_tcp_frame
from tests.conftest import free_port
from twin import coap_tls
from twin.coap_tls import (
    MAX_CONCURRENT_HANDSHAKES,
    MAX_MESSAGE_BYTES,
    TlsListener,
    add_client_ca,
    client_ssl_context,
    device_client_context,
    peer_address,
    peer_certificate,
    server_ssl_context,
    start_tls_server,
)
from twin.pipe_observations import PipeObservation

PEM = serialization.Encoding.PEM
DER = serialization.Encoding.DER

# RFC 8323 signalling codes (7.01 CSM ... 7.04 Release), and 2.05 Content.
CSM, PING, PONG, RELEASE, CONTENT = 0xE1, 0xE2, 0xE3, 0xE4, 0x45


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(PEM)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


@dataclass(frozen=True)
class Device:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self.cert.public_bytes(DER)).hexdigest()


@dataclass(frozen=True)
class Pki:
    fleet: CertificateAuthority
    server_chain: bytes
    server_key: bytes
    trust: bytes  # what clients trust: the fleet root
    trust_file: Path
    device: Device  # issued by the fleet CA the way enrollment issues them
    stranger_ca: x509.Certificate  # a CA the server does not trust at first
    stranger: Device


def device_of(fleet: CertificateAuthority, device_id: str) -> Device:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
        .sign(key, hashes.SHA256())
    )
    cert = issue_device_certificate(
        fleet,
        inspect_csr(csr.public_bytes(DER)),
        device_id=device_id,
        hardware_serial=f"SN-{device_id}",
    )
    return Device(cert, key)


def self_signed_ca(name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def leaf_of(issuer: x509.Certificate, issuer_key: ec.EllipticCurvePrivateKey, name: str) -> Device:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(issuer.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(issuer_key, hashes.SHA256())
    )
    return Device(cert, key)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    fleet, _root_key = create_fleet_ca("coap tls test")
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = issue_server_certificate(
        fleet,
        server_key.public_key(),
        dns_names=["localhost"],
        ip_addresses=["127.0.0.1", "::1"],
    )
    stranger_ca, stranger_key = self_signed_ca("stranger factory CA")
    trust_file = tmp_path_factory.mktemp("coap-tls") / "trust.pem"
    trust_file.write_bytes(pem(fleet.root_cert))
    return Pki(
        fleet=fleet,
        server_chain=pem(server_cert) + pem(fleet.issuing_cert),
        server_key=key_pem(server_key),
        trust=pem(fleet.root_cert),
        trust_file=trust_file,
        device=device_of(fleet, "lamp-n-0001"),
        stranger_ca=stranger_ca,
        stranger=leaf_of(stranger_ca, stranger_key, "stranger"),
    )


class Who(aiocoap.resource.Resource):  # type: ignore[misc]
    """Answers "<peer address> <sha256 of the client certificate or 'none'>"."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.seen: list[str] = []

    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        self.calls += 1
        der = peer_certificate(request)
        seen = hashlib.sha256(der).hexdigest() if der is not None else "none"
        self.seen.append(seen)
        return aiocoap.Message(payload=f"{peer_address(request)} {seen}".encode())

    async def render_post(self, request: aiocoap.Message) -> aiocoap.Message:
        return aiocoap.Message(code=aiocoap.CHANGED, payload=str(len(request.payload)).encode())


class Held(aiocoap.resource.Resource):  # type: ignore[misc]
    """`/held`: a GET with Observe: 0 is an observation (as devices' are) that nothing ever
    triggers, so its request stays in aiocoap's token manager until the client goes."""

    async def render_to_pipe(self, pipe: Any) -> None:
        if pipe.request.opt.observe != 0:
            await super().render_to_pipe(pipe)
            return
        await PipeObservation(pipe, self).serve()

    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        return aiocoap.Message(code=Code.CONTENT, payload=b"held")


@dataclass
class Served:
    context: aiocoap.Context
    listener: TlsListener
    tls: ssl.SSLContext
    who: Who
    udp_port: int

    stopped: bool = False

    @property
    def coaps(self) -> str:
        return f"coaps+tcp://127.0.0.1:{self.listener.port}"

    async def stop(self) -> None:
        # aiocoap contexts cannot be shut down twice.
        if not self.stopped:
            self.stopped = True
            await self.context.shutdown()


Serve = Callable[..., Awaitable[Served]]


@pytest.fixture
async def serve(pki: Pki) -> AsyncIterator[Serve]:
    """Start servers (UDP + TLS on 127.0.0.1) for the test; all are shut down after it."""
    started: list[Served] = []

    async def start(
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        max_connections: int = 10,
        idle_timeout: float = 30.0,
        max_handshakes: int = MAX_CONCURRENT_HANDSHAKES,
    ) -> Served:
        who = Who()
        site = aiocoap.resource.Site()
        site.add_resource(["who"], who)
        site.add_resource(["held"], Held())
        udp_port = free_port(socket.SOCK_DGRAM)
        context = await aiocoap.Context.create_server_context(
            site, bind=("127.0.0.1", udp_port), transports=["udp6"]
        )
        tls = server_ssl_context(pki.server_chain, pki.server_key, [pem(pki.fleet.issuing_cert)])
        listener = await start_tls_server(
            context,
            host,
            port,
            tls,
            max_connections=max_connections,
            idle_timeout=idle_timeout,
            max_handshakes=max_handshakes,
        )
        served = Served(context, listener, tls, who, udp_port)
        started.append(served)
        return served

    yield start
    for served in started:
        await served.stop()


@contextlib.asynccontextmanager
async def device_client(pki: Pki, device: Device | None = None) -> AsyncIterator[aiocoap.Context]:
    tls = client_ssl_context(
        pki.trust,
        cert_pem=pem(device.cert) if device else None,
        key_pem=key_pem(device.key) if device else None,
    )
    client = await device_client_context(tls)
    try:
        yield client
    finally:
        await client.shutdown()


async def get(client: aiocoap.Context, uri: str) -> aiocoap.Message:
    request = aiocoap.Message(code=aiocoap.GET, uri=uri)
    response: aiocoap.Message = await asyncio.wait_for(client.request(request).response, 5)
    return response


async def eventually(check: Callable[[], bool], within: float = 3.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


# -- raw TLS connections: RFC 8323 framing by hand -------------------------------------------


@dataclass
class Raw:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    def send(self, code: int, token: bytes = b"", body: bytes = b"") -> None:
        assert len(body) < 13 and len(token) <= 8
        self.writer.write(bytes([len(body) << 4 | len(token), code]) + token + body)

    async def frame(self) -> tuple[int, bytes, bytes]:
        """The next message: (code, token, options and payload)."""
        return await read_tcp_frame(self.reader)

    async def answer_to(self, token: bytes) -> tuple[int, bytes]:
        """Read (skipping the server's CSM) up to the message carrying `token`."""
        while True:
            code, got, body = await asyncio.wait_for(self.frame(), 3)
            if got == token and code != CSM:
                return code, body

    async def observe_held(self, token: bytes) -> None:
        # GET, Observe (6): 0 (empty), Uri-Path (11) "held"
        self.send(0x01, token, b"\x60\x54held")
        assert (await self.answer_to(token))[0] == CONTENT

    async def get_who(self, token: bytes) -> bytes:
        self.send(0x01, token, b"\xb3who")  # GET, Uri-Path (11) "who"
        code, body = await self.answer_to(token)
        assert code == CONTENT
        return body.partition(b"\xff")[2]

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


@contextlib.asynccontextmanager
async def raw_tls(pki: Pki, port: int, device: Device | None = None) -> AsyncIterator[Raw]:
    tls = client_ssl_context(
        pki.trust,
        cert_pem=pem(device.cert) if device else None,
        key_pem=key_pem(device.key) if device else None,
    )
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port, ssl=tls), 5)
    raw = Raw(reader, writer)
    raw.send(CSM)
    try:
        yield raw
    finally:
        await raw.close()


async def read_to_eof(raw: Raw, within: float) -> list[int]:
    """Codes of every message until the server closes the connection."""
    codes: list[int] = []
    while True:
        try:
            code, _, _ = await asyncio.wait_for(raw.frame(), within)
        except asyncio.IncompleteReadError as exc:
            assert exc.partial == b""
            return codes
        codes.append(code)


# -- client certificates -----------------------------------------------------------------------


async def test_resource_sees_the_client_certificate(serve: Serve, pki: Pki) -> None:
    served = await serve()
    async with device_client(pki, pki.device) as client:
        response = await get(client, served.coaps + "/who")
    assert response.code == Code.CONTENT
    assert response.payload.decode() == f"127.0.0.1 {pki.device.fingerprint}"


async def test_without_a_client_certificate_there_is_none(serve: Serve, pki: Pki) -> None:
    served = await serve()
    async with device_client(pki) as client:
        response = await get(client, served.coaps + "/who")
    assert response.payload.decode() == "127.0.0.1 none"


async def test_aiocoap_credentials_recipe_without_client_certificate(
    serve: Serve, pki: Pki
) -> None:
    served = await serve()
    client = await aiocoap.Context.create_client_context(transports=["tlsclient"])
    try:
        client.client_credentials.load_from_dict(
            {served.coaps + "/*": {"tlscert": {"certfile": str(pki.trust_file)}}}
        )
        response = await get(client, served.coaps + "/who")
    finally:
        await client.shutdown()
    assert response.payload.decode() == "127.0.0.1 none"


async def test_a_certificate_from_an_untrusted_ca_is_refused(serve: Serve, pki: Pki) -> None:
    served = await serve()
    async with device_client(pki, pki.stranger) as client:
        with pytest.raises(aiocoap.error.NetworkError):
            await get(client, served.coaps + "/who")
    assert served.who.calls == 0
    await eventually(lambda: served.listener.open_connections == 0)
    assert served.listener.failed_handshakes == 1


async def test_a_ca_added_while_running_is_trusted_for_new_connections(
    serve: Serve, pki: Pki
) -> None:
    served = await serve()
    async with device_client(pki, pki.stranger) as client:
        with pytest.raises(aiocoap.error.NetworkError):
            await get(client, served.coaps + "/who")

    add_client_ca(served.tls, pem(pki.stranger_ca))

    async with device_client(pki, pki.stranger) as client:
        response = await get(client, served.coaps + "/who")
    assert response.payload.decode() == f"127.0.0.1 {pki.stranger.fingerprint}"
    # The fleet's own devices are still let in.
    async with device_client(pki, pki.device) as client:
        response = await get(client, served.coaps + "/who")
    assert response.payload.decode().endswith(pki.device.fingerprint)


def test_add_client_ca_refuses_what_is_not_a_certificate(pki: Pki) -> None:
    context = server_ssl_context(pki.server_chain, pki.server_key, [])
    with pytest.raises(ValueError):
        add_client_ca(context, "é".encode())
    with pytest.raises(ssl.SSLError):
        add_client_ca(context, b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")


# -- limits --------------------------------------------------------------------------------------


async def test_connections_beyond_the_cap_are_refused(serve: Serve, pki: Pki) -> None:
    served = await serve(max_connections=2)
    listener = served.listener
    async with (
        raw_tls(pki, listener.port, pki.device) as first,
        raw_tls(pki, listener.port) as second,
    ):
        assert first.writer.get_extra_info("ssl_object").selected_alpn_protocol() == "coap"
        await eventually(lambda: listener.open_connections == 2)

        with pytest.raises(OSError):
            async with raw_tls(pki, listener.port) as third:
                await third.get_who(b"\x03")
        assert listener.refused_connections == 1
        assert listener.open_connections == 2

        # The two admitted connections keep working, each with its own identity.
        assert (await first.get_who(b"\x01")).decode().endswith(pki.device.fingerprint)
        assert (await second.get_who(b"\x02")).decode().endswith(" none")

        await first.close()
        await eventually(lambda: listener.open_connections == 1)
        # A slot is free again.
        async with device_client(pki) as client:
            assert (await get(client, served.coaps + "/who")).code == Code.CONTENT
    await eventually(lambda: listener.open_connections == 0)
    assert listener.refused_connections == 1


# aiocoap's own Pong construction warns; not this code's doing.
@pytest.mark.filterwarnings("ignore:Initializing messages with a token:DeprecationWarning")
async def test_idle_connections_are_released_and_closed(serve: Serve, pki: Pki) -> None:
    served = await serve(idle_timeout=0.3)
    listener = served.listener
    async with (
        raw_tls(pki, listener.port) as idle,
        raw_tls(pki, listener.port) as busy,
        raw_tls(pki, listener.port) as trickle,
    ):
        opened = time.monotonic()
        # `trickle` announces a 12-byte GET and then sends it a byte at a time: bytes that
        # never complete a message must not keep a connection open.
        trickle.writer.write(bytes([12 << 4, 0x01]))
        # Pinging every 0.1 s keeps `busy` open well past the timeout...
        for token in range(1, 8):
            busy.send(PING, bytes([token]))
            assert await busy.answer_to(bytes([token])) == (PONG, b"")
            if not trickle.writer.is_closing():
                trickle.writer.write(b"\x00")
            await asyncio.sleep(0.1)
        # ...while `idle`, silent since its CSM, and `trickle` were released and closed.
        assert await read_to_eof(idle, within=1) == [CSM, RELEASE]
        assert await read_to_eof(trickle, within=1) == [CSM, RELEASE]
        assert listener.idle_closed_connections == 2
        assert time.monotonic() - opened >= 0.3
        # Once `busy` falls silent it goes the same way.
        assert await read_to_eof(busy, within=1) == [RELEASE]
        assert listener.idle_closed_connections == 3
    await eventually(lambda: listener.open_connections == 0)


async def test_a_stalled_handshake_is_dropped(serve: Serve) -> None:
    served = await serve(idle_timeout=0.3)
    reader, writer = await asyncio.open_connection("127.0.0.1", served.listener.port)
    try:
        await eventually(lambda: served.listener.open_connections == 1)
        # No ClientHello ever comes: the server gives up after the timeout.
        assert await asyncio.wait_for(reader.read(), 2) == b""
        await eventually(lambda: served.listener.open_connections == 0)
        assert served.listener.failed_handshakes == 1
    finally:
        writer.close()


async def test_handshakes_beyond_the_cap_wait_in_the_listen_backlog(serve: Serve, pki: Pki) -> None:
    served = await serve(max_handshakes=2)
    listener = served.listener
    # Three TCP connections that never start their TLS handshake.
    stalled = [await asyncio.open_connection("127.0.0.1", listener.port) for _ in range(3)]
    try:
        await eventually(lambda: listener.handshaking_connections == 2)
        await asyncio.sleep(0.3)
        # The third is not accepted (its TCP handshake is done: it waits in the backlog).
        assert listener.open_connections == 2
        assert listener.refused_connections == 0

        # One gives up: the third takes its slot.
        stalled[0][1].close()
        await eventually(lambda: listener.failed_handshakes == 1)
        await eventually(lambda: listener.open_connections == 2)
        assert listener.handshaking_connections == 2
        # Another gives up: a device gets the free slot and is served; once its handshake
        # is done, it no longer holds one.
        stalled[1][1].close()
        async with device_client(pki, pki.device) as client:
            assert (await get(client, served.coaps + "/who")).code == Code.CONTENT
            assert listener.handshaking_connections == 1
            assert listener.open_connections == 2
    finally:
        for _, writer in stalled:
            writer.close()
    await eventually(lambda: listener.open_connections == 0)
    assert listener.handshaking_connections == 0


async def test_limits_must_be_positive() -> None:
    tls = ssl.create_default_context()
    for cap, idle, handshakes in ((0, 1.0, 1), (1, 0.0, 1), (1, 1.0, 0)):
        with pytest.raises(ValueError):
            # Checked before the context is touched.
            await start_tls_server(
                None,
                "127.0.0.1",
                0,
                tls,
                max_connections=cap,
                idle_timeout=idle,
                max_handshakes=handshakes,
            )


# -- a lost connection's requests ------------------------------------------------------------


class CountingRequests(dict[Any, Any]):
    """aiocoap's `incoming_requests`, counting the entries anything iterates over."""

    visited = 0

    def _count(self, entries: Any) -> Iterator[Any]:
        for entry in entries:
            self.visited += 1
            yield entry

    def items(self) -> Any:
        return self._count(super().items())

    def keys(self) -> Any:
        return self._count(super().keys())

    def values(self) -> Any:
        return self._count(super().values())

    def __iter__(self) -> Iterator[Any]:
        return self._count(super().__iter__())


def counted_requests(served: Served) -> CountingRequests:
    """Swap the TLS transport's token manager's request table for a counting one."""
    manager = served.listener._server._tokenmanager
    counting = CountingRequests(manager.incoming_requests)
    manager.incoming_requests = counting
    return counting


async def test_a_lost_connection_ends_its_requests_without_visiting_others(
    serve: Serve, pki: Pki
) -> None:
    served = await serve()
    server = served.listener._server
    requests = counted_requests(served)
    async with contextlib.AsyncExitStack() as stack:
        raws = [
            await stack.enter_async_context(raw_tls(pki, served.listener.port)) for _ in range(5)
        ]
        for raw in raws:
            await raw.observe_held(b"\x01")
            await raw.observe_held(b"\x02")
        assert len(requests) == 10
        # One device's connection goes, abruptly (no close_notify, no Release)...
        raws[0].writer.transport.abort()
        await eventually(lambda: len(requests) == 8)
        # ...another's in order, with a Release.
        raws[1].send(RELEASE)
        await eventually(lambda: len(requests) == 6)
        await eventually(lambda: served.listener.open_connections == 3)
        # aiocoap 0.4.17 alone walks all of the server's requests on each loss (and twice on
        # a Release): 24 entries here, O(N^2) for N devices leaving at once.
        assert requests.visited == 0
        # The others are untouched and still observed.
        remaining = {(token, remote) for token, remote in dict.keys(requests)}
        assert {remote for _, remote in remaining} == set(server.connections)
    # Every device gone: nothing is left behind.
    await eventually(lambda: served.listener.open_connections == 0)
    assert dict(requests) == {}
    assert server._pool == set()
    assert requests.visited == 0


async def test_a_connection_remembers_only_its_unfinished_requests(serve: Serve, pki: Pki) -> None:
    served = await serve()
    requests = counted_requests(served)
    async with raw_tls(pki, served.listener.port) as raw:
        await raw.observe_held(b"\x00\x01")
        for number in range(2, 200):
            await raw.get_who(number.to_bytes(2, "big"))
        (connection,) = served.listener._server.connections
        # Finished requests are pruned: the list stays short however many are made...
        assert len(connection.request_tokens) < 40
        assert len(requests) == 1
    # ...and the observation made first is still ended with the connection.
    await eventually(lambda: len(requests) == 0)
    assert requests.visited == 0


# -- session tickets -----------------------------------------------------------------------------


class TicketCounting:
    """A device's TLS client context that counts the session tickets it receives."""

    def __init__(self, pki: Pki, device: Device) -> None:
        self.device = device
        self.tickets = 0
        self.context = client_ssl_context(
            pki.trust, cert_pem=pem(device.cert), key_pem=key_pem(device.key)
        )
        self.context._msg_callback = self._count  # type: ignore[attr-defined]

    def _count(
        self, conn: Any, direction: str, version: Any, kind: Any, message: Any, _: Any
    ) -> None:
        # TLS handshake message type 4: NewSessionTicket (RFC 8446 section 4.6.1).
        if direction == "read" and kind == ssl._TLSContentType.HANDSHAKE and message == 4:
            self.tickets += 1

    def connect(
        self, port: int, session: ssl.SSLSession | None = None
    ) -> tuple[ssl.SSLSession | None, bool, bytes]:
        """A blocking connection (resuming `session` if given) that asks GET /who: (the
        session, whether it was resumed, the bytes up to the answer)."""
        with (
            socket.create_connection(("127.0.0.1", port), timeout=5) as sock,
            self.context.wrap_socket(sock, server_hostname="127.0.0.1", session=session) as tls,
        ):
            tls.sendall(bytes([0, CSM]) + bytes([0x41, 0x01, 0x07]) + b"\xb3who")  # CSM, GET /who
            answer = b""
            while self.device.fingerprint.encode() not in answer:
                chunk = tls.recv(4096)
                assert chunk, "closed before the answer"
                answer += chunk
            return tls.session, tls.session_reused, answer


async def test_one_session_ticket_per_handshake_and_resumption_keeps_the_identity(
    serve: Serve, pki: Pki
) -> None:
    served = await serve()
    port = served.listener.port
    device = TicketCounting(pki, pki.device)
    session, resumed, _ = await asyncio.to_thread(device.connect, port)
    # OpenSSL sends two by default; a device, with one connection, resumes from one.
    assert (device.tickets, resumed) == (1, False)
    assert session is not None and session.has_ticket
    _, resumed, answer = await asyncio.to_thread(device.connect, port, session)
    # A resumed connection carries the device's certificate from the ticket, and gets a new
    # ticket to resume from next time.
    assert (device.tickets, resumed) == (2, True)
    assert served.who.seen == [pki.device.fingerprint] * 2
    assert answer.endswith(pki.device.fingerprint.encode())


# -- binding and addresses ---------------------------------------------------------------------


async def test_the_requested_port_is_bound_exactly(serve: Serve, pki: Pki) -> None:
    port = free_port()
    served = await serve(port=port)
    assert served.listener.port == port
    async with device_client(pki) as client:
        response = await get(client, f"coaps+tcp://127.0.0.1:{port}/who")
    assert response.code == Code.CONTENT


async def test_port_zero_binds_an_ephemeral_port(serve: Serve) -> None:
    first, second = await serve(), await serve()
    assert first.listener.port > 0
    assert first.listener.port != second.listener.port


async def test_peer_address_over_udp_and_tls(serve: Serve, pki: Pki) -> None:
    served = await serve()
    udp = await aiocoap.Context.create_client_context(transports=["udp6"])
    try:
        over_udp = await get(udp, f"coap://127.0.0.1:{served.udp_port}/who")
    finally:
        await udp.shutdown()
    # Over UDP there is no certificate, whatever the client has.
    assert over_udp.payload.decode() == "127.0.0.1 none"
    async with device_client(pki, pki.device) as client:
        over_tls = await get(client, served.coaps + "/who")
    assert over_tls.payload.decode().startswith("127.0.0.1 ")


# -- shutdown and key loading --------------------------------------------------------------------


async def test_shutdown_closes_open_connections(serve: Serve, pki: Pki) -> None:
    served = await serve()
    async with raw_tls(pki, served.listener.port) as raw:
        await raw.get_who(b"\x01")
        assert served.listener.open_connections == 1
        started = time.monotonic()
        await served.stop()
        # An orderly close (Release, close_notify both ways), well within the 1 s after which
        # stragglers are aborted.
        assert time.monotonic() - started < 0.8
        assert served.listener.open_connections == 0
        # aiocoap releases the connection, then it is closed.
        assert await read_to_eof(raw, within=1) == [RELEASE]
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", served.listener.port)


def test_key_loads_through_a_private_temporary_file_without_memfd(
    pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[int] = []
    real_load = ssl.SSLContext.load_cert_chain

    def load(self: ssl.SSLContext, certfile: str, *args: Any, **kwargs: Any) -> None:
        seen.append(Path(certfile).stat().st_mode & 0o777)
        real_load(self, certfile, *args, **kwargs)

    monkeypatch.setattr(coap_tls, "_memfd", lambda: None)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(ssl.SSLContext, "load_cert_chain", load)
    server_ssl_context(pki.server_chain, pki.server_key, [])
    assert seen == [0o600]
    assert list(tmp_path.iterdir()) == []  # gone right after loading


def test_an_encrypted_key_is_refused_not_prompted_for(pki: Pki) -> None:
    key = serialization.load_pem_private_key(pki.server_key, password=None)
    encrypted = key.private_bytes(
        PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    with pytest.raises(ValueError, match="encrypted"):
        server_ssl_context(pki.server_chain, encrypted, [])


def test_client_certificate_needs_its_key(pki: Pki) -> None:
    with pytest.raises(ValueError):
        client_ssl_context(pki.trust, cert_pem=pem(pki.device.cert))


async def test_connections_share_the_listener_read_buffer(serve: Serve, pki: Pki) -> None:
    served = await serve()
    server = served.listener._server
    async with device_client(pki, pki.device) as one, device_client(pki) as other:
        for client in (one, other):
            assert (await get(client, served.coaps + "/who")).code == aiocoap.CONTENT
        streams = [c.stream for c in server.connections]
        assert len(streams) == 2
        assert all(s is not None and s._buffer is server.read_buffer for s in streams)
        # Messages larger than the buffer (and than a TLS record), on both connections at
        # once, still arrive whole and unmixed.
        requests = [
            client.request(
                aiocoap.Message(code=aiocoap.POST, uri=served.coaps + "/who", payload=body)
            ).response
            for client, body in ((one, b"x" * 100_000), (other, b"y" * 70_000))
        ]
        responses = await asyncio.wait_for(asyncio.gather(*requests), 5)
        assert [r.payload for r in responses] == [b"100000", b"70000"]


async def test_the_certificate_outlives_a_connection_closed_before_its_answer(
    serve: Serve, pki: Pki
) -> None:
    served = await serve()
    async with raw_tls(pki, served.listener.port, pki.device) as raw:
        raw.send(0x01, b"\x09", b"\xb3who")  # GET /who, and gone before the answer
    await eventually(lambda: served.who.calls == 1)
    assert served.who.seen == [pki.device.fingerprint]


async def test_shutdown_drops_connections_still_in_their_handshake(serve: Serve) -> None:
    served = await serve()
    reader, writer = await asyncio.open_connection("127.0.0.1", served.listener.port)
    try:
        await eventually(lambda: served.listener.open_connections == 1)
        await served.stop()
        assert served.listener.open_connections == 0
        assert served.listener.failed_handshakes == 0  # not a failure: we went away
        assert await asyncio.wait_for(reader.read(), 2) == b""
    finally:
        writer.close()


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback on this machine")
async def test_ipv6_loopback(serve: Serve, pki: Pki) -> None:
    served = await serve(host="::1")
    async with device_client(pki) as client:
        response = await get(client, f"coaps+tcp://[::1]:{served.listener.port}/who")
    assert response.payload.decode() == "::1 none"


async def test_messages_beyond_the_announced_size_end_the_connection(
    serve: Serve, pki: Pki
) -> None:
    served = await serve()
    async with device_client(pki, pki.device) as client:
        # aiocoap's client honours the announced size and goes block-wise by itself.
        big = aiocoap.Message(code=aiocoap.POST, uri=served.coaps + "/who", payload=b"x" * 100_000)
        response = await asyncio.wait_for(client.request(big).response, 5)
        assert response.payload == b"100000"
    async with raw_tls(pki, served.listener.port, pki.device) as raw:
        code, _, options = await asyncio.wait_for(raw.frame(), 3)
        # The server's CSM: option 2 (Max-Message-Size), delta 2, 3-byte value.
        assert code == CSM and options[0] == 0x23
        assert int.from_bytes(options[1:4], "big") == MAX_MESSAGE_BYTES
        # One message announcing more than that: the server aborts the connection.
        length = MAX_MESSAGE_BYTES + 1
        raw.writer.write(bytes([15 << 4, 0x02]) + (length - 65805).to_bytes(4, "big"))
        codes = await read_to_eof(raw, 3)
        assert codes == [0xE5]  # 7.05 Abort


async def test_a_device_trusting_the_whole_fleet_chain_sends_only_its_own_certificate(
    serve: Serve, pki: Pki
) -> None:
    # Trusting the issuing CA too would let OpenSSL complete (and send) the device's chain,
    # which the server would keep parsed per connection; only the root stays an anchor.
    whole_chain = pki.trust + pem(pki.fleet.issuing_cert)
    device = pem(pki.device.cert)
    presenting = client_ssl_context(whole_chain, cert_pem=device, key_pem=key_pem(pki.device.key))
    assert len(presenting.get_ca_certs()) == 1
    assert len(client_ssl_context(whole_chain).get_ca_certs()) == 2
    served = await serve()
    client = await device_client_context(presenting)
    try:
        response = await get(client, served.coaps + "/who")
    finally:
        await client.shutdown()
    assert response.payload.decode() == f"127.0.0.1 {pki.device.fingerprint}"
