"""CoAP over TLS (RFC 8323, `coaps+tcp`) for devices, on top of aiocoap's TLS transport.

This is the only module that touches aiocoap's private TLS internals: it subclasses
`aiocoap.transports.tls.TLSServer` and `aiocoap.transports.tcp.TcpConnection`, reads their
private attributes (`_transport`, `_spool`, `_pool`, `_tokenmanager`, `_send_message`) and
registers the transport with `Context._append_tokenmanaged_transport`. None of that is a stable
API, which is why pyproject.toml pins aiocoap to 0.4.17; an upgrade must re-check this module,
and tests/twin/test_coap_tls.py exercises every hook. Everything else uses the functions here.

What it adds to aiocoap's own `tlsserver` transport:

* The port is bound as given. aiocoap's `TCPServer.create_server` adds COAPS_PORT - COAP_PORT
  to a TLS bind port; port 0 (ephemeral) works and the bound port is `TlsListener.port`.
  `::` listens dual-stack on one socket (as aiocoap's UDP transport does), where asyncio would
  listen on IPv6 only.
* A connection cap. Connections are accepted as plain TCP and upgraded with
  `loop.start_tls`, so one beyond `max_connections` is closed before any TLS work.
* An idle timeout: a connection that completes no CoAP message (a Ping counts) for
  `idle_timeout` seconds gets a Release and is closed. Devices that only wait for Observe
  notifications must ping more often than that. The TLS handshake is bounded by it too.
* The client certificate of each connection (`peer_certificate`), which aiocoap does not hand
  to resources (`authenticated_claims` stays empty on TLS).
* `context.shutdown()` closes the connections too; aiocoap only sends them a Release.

For clients (devices, tests), `client_ssl_context` and `device_client_context` give an aiocoap
client that presents a client certificate, which aiocoap's credentials map cannot express.

A plain asyncio TLS connection costs ~290 KiB, mostly a fixed 256 KiB read buffer; each of
ours gets a 4 KiB one instead (`READ_BUFFER_BYTES`; bench/connections.py measures the
cost per connected device), and `max_connections` bounds the total.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import socket
import ssl
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import aiocoap
import aiocoap.util
from aiocoap.numbers.codes import RELEASE
from aiocoap.transports.tcp import TcpConnection
from aiocoap.transports.tls import TLSServer

log = logging.getLogger(__name__)

ALPN_COAP = "coap"  # RFC 8323 section 4.1
# A client that has not finished its handshake by then is holding a connection slot for nothing.
MAX_HANDSHAKE_SECONDS = 10.0
# Waiting for a peer's close_notify; an idle peer may well be gone for good.
_TLS_CLOSE_SECONDS = 2.0
# How long context.shutdown() lets connections close in order before aborting the rest;
# aiocoap gives the whole shutdown 3 s.
_SHUTDOWN_GRACE_SECONDS = 1.0


def server_ssl_context(
    cert_chain_pem: bytes, key_pem: bytes, client_ca_pems: list[bytes]
) -> ssl.SSLContext:
    """A TLS server context for `coaps+tcp`.

    `cert_chain_pem` is the server certificate followed by its intermediates, `key_pem` its
    unencrypted private key (PEM, never written to disk where the platform allows; see
    `_private_file`). TLS 1.2 or newer, ALPN "coap". A client certificate is optional at the
    TLS layer (resources decide what an anonymous client may do); one that is presented must
    chain to one of `client_ca_pems` or the handshake fails. Each of those certificates is a
    trust anchor in itself, so an intermediate CA can be trusted without its root.

    Raises `ssl.SSLError` if the chain, the key or a CA certificate does not load, and
    `ValueError` if the key is encrypted.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols([ALPN_COAP])
    # The client certificate is read once per connection; renegotiation could swap it.
    context.options |= ssl.OP_NO_RENEGOTIATION
    context.verify_mode = ssl.CERT_OPTIONAL
    # Enrollment groups may name an intermediate (manufacturer) CA whose root we do not hold.
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    with _private_file(cert_chain_pem.rstrip(b"\n") + b"\n" + key_pem) as path:
        context.load_cert_chain(path, password=_refuse_encrypted_key)
    for pem in client_ca_pems:
        add_client_ca(context, pem)
    return context


def add_client_ca(context: ssl.SSLContext, pem: bytes) -> None:
    """Trust one more CA (PEM, one or more certificates) for client certificates, from the
    next handshake on; connections already open are not affected.

    There is no removal: OpenSSL cannot take a certificate out of a live trust store. A CA that
    is no longer trusted (a deleted enrollment group) stays in the store until restart, so the
    application must check every peer certificate it acts on against its own records, which it
    does anyway for revocation.

    Raises `ValueError` if `pem` is not ASCII and `ssl.SSLError` if it holds no certificate.
    """
    try:
        text = pem.decode("ascii")
    except UnicodeDecodeError as exc:
        raise ValueError("a CA certificate must be PEM (ASCII)") from exc
    context.load_verify_locations(cadata=text)


def client_ssl_context(
    trust_pem: bytes, *, cert_pem: bytes | None = None, key_pem: bytes | None = None
) -> ssl.SSLContext:
    """A TLS client context as a device uses it on `coaps+tcp`: TLS 1.2 or newer, ALPN "coap",
    the server's name checked, trusting only `trust_pem` (e.g. the fleet CA chain from `crts`;
    any certificate in it is an anchor by itself). With `cert_pem` (the client certificate,
    then any intermediates) and its unencrypted `key_pem`, it presents a client certificate.

    Raises `ValueError` if only one of `cert_pem` and `key_pem` is given or the key is
    encrypted, and `ssl.SSLError` if something does not load.
    """
    if (cert_pem is None) != (key_pem is None):
        raise ValueError("a client certificate needs its key, and a key its certificate")
    try:
        trust = trust_pem.decode("ascii")
    except UnicodeDecodeError as exc:
        raise ValueError("trusted certificates must be PEM (ASCII)") from exc
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=trust)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols([ALPN_COAP])
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    if cert_pem is not None and key_pem is not None:
        with _private_file(cert_pem.rstrip(b"\n") + b"\n" + key_pem) as path:
            context.load_cert_chain(path, password=_refuse_encrypted_key)
    return context


async def device_client_context(ssl_context: ssl.SSLContext) -> aiocoap.Context:
    """An aiocoap client context (`coaps+tcp` only) whose TLS connections to every host use
    `ssl_context`, such as one from `client_ssl_context`. Shut it down when done.

    aiocoap's own client credentials cannot do this: a `{"tlscert": {"certfile": ...}}` entry
    only names a CA file (no client certificate), and it is found only under the exact key
    `coaps+tcp://HOST:PORT/*` (the `coaps+tcp://*` fallback is never reached in 0.4.17). So the
    context's credentials map answers every TLS lookup with `ssl_context` instead.
    """
    context = await aiocoap.Context.create_client_context(transports=["tlsclient"])

    def fixed(scheme: str, hostinfo: str) -> ssl.SSLContext:
        return ssl_context

    # The TLS client transport holds this very map and asks it on every new connection.
    context.client_credentials.ssl_client_context = fixed
    return context


class TlsListener:
    """A running `coaps+tcp` listener, as `start_tls_server` returns it.

    Read-only counters for tests and metrics; the listener stops with the aiocoap context.
    """

    def __init__(self, server: _TlsServer) -> None:
        self._server = server

    @property
    def port(self) -> int:
        """The TCP port actually bound (the ephemeral one when 0 was asked for)."""
        return self._server.port

    @property
    def open_connections(self) -> int:
        """Connections accepted and not yet closed, those still in their handshake included."""
        return len(self._server.connections)

    @property
    def refused_connections(self) -> int:
        """Connections closed at accept because `max_connections` were open, since start."""
        return self._server.refused

    @property
    def idle_closed_connections(self) -> int:
        """Connections closed for being idle longer than `idle_timeout`, since start."""
        return self._server.idle_closed

    @property
    def failed_handshakes(self) -> int:
        """Connections dropped in the TLS handshake (untrusted client certificate, no common
        protocol version, timeout, reset), since start."""
        return self._server.failed_handshakes


async def start_tls_server(
    context: aiocoap.Context,
    host: str,
    port: int,
    ssl_context: ssl.SSLContext,
    *,
    max_connections: int,
    idle_timeout: float,
    handshake_timeout: float = MAX_HANDSHAKE_SECONDS,
) -> TlsListener:
    """Serve `coaps+tcp` on `host`:`port` (0: an ephemeral port) for the site of `context`,
    an aiocoap server context such as `Context.create_server_context(site, bind=...,
    transports=["udp6"])`.

    At most `max_connections` are open at once (further ones are closed at accept); one that
    completes no CoAP message for `idle_timeout` seconds is released and closed, and a TLS
    handshake may take at most the smaller of `idle_timeout` and `handshake_timeout`.
    `context.shutdown()` stops the listener and closes its connections. (A host name with
    several addresses gets a socket each; with port 0 those ports differ and `port` is the
    first one's. Give an address to avoid that.)

    Raises `ValueError` for a non-positive limit and `OSError` if the address cannot be bound.
    """
    if max_connections < 1:
        raise ValueError(f"max_connections must be at least 1, not {max_connections}")
    if not idle_timeout > 0 or not handshake_timeout > 0:
        raise ValueError("idle_timeout and handshake_timeout must be positive")
    loop = asyncio.get_running_loop()
    created: list[_TlsServer] = []

    async def construct(token_manager: Any) -> _TlsServer:
        server = _TlsServer(
            token_manager,
            context.log,
            loop,
            ssl_context,
            max_connections=max_connections,
            idle_timeout=idle_timeout,
            handshake_timeout=min(idle_timeout, handshake_timeout),
        )
        await server.listen(host, port)
        created.append(server)
        return server

    await context._append_tokenmanaged_transport(construct)
    return TlsListener(created[0])


def peer_certificate(request: aiocoap.Message) -> bytes | None:
    """The DER client certificate of the TLS connection `request` arrived on.

    None if the client presented none, or if the request came over another transport (UDP).
    The certificate chains to a CA trusted at handshake time; whether it is still acceptable
    (revoked, superseded, its CA withdrawn) is for the caller to check.
    """
    remote = _transport_remote(request)
    if isinstance(remote, _TlsConnection):
        return remote.peer_certificate
    return None


def peer_address(request: aiocoap.Message) -> str:
    """The IP address `request` came from, over any transport, as a plain string.

    IPv4 clients of a dual-stack socket give their IPv4 address ("127.0.0.1", not
    "::ffff:127.0.0.1"), so rate limits and audit logs see one form per host.
    """
    remote = _transport_remote(request)
    if isinstance(remote, _TlsConnection):
        host = remote.peer_host
    elif isinstance(getattr(remote, "sockaddr", None), tuple):
        host = str(remote.sockaddr[0])  # aiocoap's udp6: the raw socket address
    else:
        host = str(aiocoap.util.hostportsplit(remote.hostinfo)[0])
    return _plain_ip(host)


# -- the transport ---------------------------------------------------------------------------

# asyncio's TLS protocol reads into a buffer of a fixed 256 KiB per connection (Python 3.11's
# sslproto.SSLProtocol.max_size): most of what an idle device connection costs. Device
# messages are small (a report is well under 4 KiB), and the buffer only bounds how much
# decrypted data one read hands on: larger messages take a few more reads. (OpenSSL's own
# record buffers are released between records: CPython sets SSL_MODE_RELEASE_BUFFERS.)
READ_BUFFER_BYTES = 4 * 1024
# The largest CoAP message a device may send in one piece (a 64 KiB report plus headers).
MAX_MESSAGE_BYTES = 72 * 1024


def _shrink_read_buffer(tls_transport: asyncio.Transport) -> None:
    """Give one connection's TLS protocol a small read buffer. Safe between protocol
    callbacks: the buffer only holds data during a single recv_into/buffer_updated pair."""
    protocol = getattr(tls_transport, "_ssl_protocol", None)
    if protocol is None or not hasattr(protocol, "_ssl_buffer"):
        return  # another asyncio implementation: keep its own buffer
    protocol.max_size = READ_BUFFER_BYTES
    protocol._ssl_buffer = bytearray(READ_BUFFER_BYTES)
    protocol._ssl_buffer_view = memoryview(protocol._ssl_buffer)


class _TlsServer(TLSServer):  # type: ignore[misc]
    """aiocoap's TLS server transport, with its own listening socket and accept path."""

    def __init__(
        self,
        token_manager: Any,
        coap_log: logging.Logger,
        loop: asyncio.AbstractEventLoop,
        ssl_context: ssl.SSLContext,
        *,
        max_connections: int,
        idle_timeout: float,
        handshake_timeout: float,
    ) -> None:
        super().__init__()
        self._tokenmanager = token_manager
        self.log = coap_log
        self.loop = loop
        self.ssl_context = ssl_context
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.handshake_timeout = handshake_timeout
        self.port = 0
        self.refused = 0
        self.idle_closed = 0
        self.failed_handshakes = 0
        # Every accepted connection until it is lost, handshaking ones included; aiocoap's
        # `_pool` holds only those past the handshake, which are the ones it may send on.
        self.connections: set[_TlsConnection] = set()
        self.closing = False
        self._handshakes: set[asyncio.Task[None]] = set()
        self._cap_logged = False

    async def listen(self, host: str, port: int) -> None:
        self.server = await _listen(self.loop, lambda: _Gate(self), host, port)
        self.port = int(self.server.sockets[0].getsockname()[1])

    def admit(self, transport: asyncio.Transport) -> None:
        """Take a freshly accepted TCP connection into a TLS handshake, or refuse it."""
        if self.closing or len(self.connections) >= self.max_connections:
            transport.abort()
            self.refused += 1
            if not self._cap_logged and not self.closing:
                log.warning(
                    "coaps+tcp: %d connections open; refusing new ones", self.max_connections
                )
                self._cap_logged = True
            return
        # Nothing may reach the plain protocol before start_tls puts TLS in its place.
        transport.pause_reading()
        connection = _TlsConnection(self)
        self.connections.add(connection)
        task = self.loop.create_task(self._handshake(transport, connection))
        self._handshakes.add(task)
        task.add_done_callback(self._handshakes.discard)

    async def _handshake(self, transport: asyncio.Transport, connection: _TlsConnection) -> None:
        tls_transport: asyncio.Transport | None = None
        try:
            tls_transport = await self.loop.start_tls(
                transport,
                connection,
                self.ssl_context,
                server_side=True,
                ssl_handshake_timeout=self.handshake_timeout,
                ssl_shutdown_timeout=_TLS_CLOSE_SECONDS,
            )
        except OSError as exc:  # ssl.SSLError, resets, the handshake timeout
            log.debug("coaps+tcp: TLS handshake failed: %s", exc)
        finally:
            # start_tls hands back None when the peer vanished mid-handshake without an error.
            if tls_transport is None:
                self.forget(connection)
                transport.abort()
                if not self.closing:
                    self.failed_handshakes += 1
        if tls_transport is not None:
            _shrink_read_buffer(tls_transport)
            connection.tls_established(tls_transport)

    def forget(self, connection: _TlsConnection) -> None:
        self.connections.discard(connection)
        if len(self.connections) < self.max_connections:
            self._cap_logged = False

    async def shutdown(self) -> None:
        self.closing = True
        handshakes = list(self._handshakes)
        for task in handshakes:
            task.cancel()
        if handshakes:
            await asyncio.wait(handshakes)
        await super().shutdown()
        open_ones = list(self.connections)
        for connection in open_ones:
            connection.close()
        waiting = [c.lost for c in open_ones if not c.lost.done()]
        if waiting:
            await asyncio.wait(waiting, timeout=_SHUTDOWN_GRACE_SECONDS)
        for connection in open_ones:
            if not connection.lost.done():
                connection.abort_transport()


class _Gate(asyncio.Protocol):
    """The protocol of a plain TCP connection until start_tls replaces it."""

    def __init__(self, server: _TlsServer) -> None:
        self._server = server

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._server.admit(transport)


class _TlsConnection(TcpConnection):  # type: ignore[misc]
    """One device connection: aiocoap's, plus its certificate, peer host and idle timer."""

    # Announced in our CSM (RFC 8323 Max-Message-Size) and enforced on receipt; aiocoap's
    # 1 MiB would let every connection hold a megabyte before any resource can refuse it.
    # Larger bodies go block-wise (which resources bound themselves).
    _my_max_message_size = MAX_MESSAGE_BYTES

    def __init__(self, server: _TlsServer) -> None:
        super().__init__(server, server.log, server.loop, is_server=True)
        self._server = server
        self.peer_certificate: bytes | None = None
        self.peer_host = ""
        self.lost: asyncio.Future[None] = server.loop.create_future()
        # The handshake completes and TLS reads on before the task that awaited it resumes;
        # what arrives in between waits here.
        self._early: list[bytes] = []
        self._last_message = 0.0
        self._idle_timer: asyncio.TimerHandle | None = None

    def tls_established(self, transport: asyncio.Transport) -> None:
        if self.lost.done() or transport.is_closing():
            return
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            self.peer_certificate = ssl_object.getpeercert(binary_form=True)
        self.peer_host = str(transport.get_extra_info("peername")[0])
        super().connection_made(transport)
        self._server._pool.add(self)
        self._last_message = self.loop.time()
        self._idle_timer = self.loop.call_later(self._server.idle_timeout, self._check_idle)
        early, self._early = self._early, []
        for data in early:
            self.data_received(data)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # start_tls does not call this; tls_established does aiocoap's part once TLS is up.
        pass

    def data_received(self, data: bytes) -> None:
        if self._transport is None:
            self._early.append(data)
            return
        if self._server.closing:
            return  # the token manager is gone; nothing could handle a request now
        expected = len(self._spool) + len(data)
        super().data_received(data)
        # The spool shrinks only when a complete message was taken off it.
        if len(self._spool) < expected:
            self._last_message = self.loop.time()

    def connection_lost(self, exc: Exception | None) -> None:
        self._server.forget(self)
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        if not self.lost.done():
            self.lost.set_result(None)
        if self._transport is not None:
            super().connection_lost(exc)

    def _check_idle(self) -> None:
        # One timer per connection, re-armed for the remaining time rather than on every
        # message: a busy connection costs nothing here.
        remaining = self._last_message + self._server.idle_timeout - self.loop.time()
        if remaining > 0:
            self._idle_timer = self.loop.call_later(remaining, self._check_idle)
            return
        self._idle_timer = None
        self._server.idle_closed += 1
        log.debug("coaps+tcp: closing idle connection from %s", self.peer_host)
        self._send_message(aiocoap.Message(code=RELEASE))
        self.close()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def abort_transport(self) -> None:
        if self._transport is not None:
            self._transport.abort()


# -- helpers ---------------------------------------------------------------------------------


async def _listen(
    loop: asyncio.AbstractEventLoop,
    protocol_factory: Callable[[], asyncio.Protocol],
    host: str,
    port: int,
) -> asyncio.Server:
    try:
        unspecified_v6 = ipaddress.ip_address(host) == ipaddress.IPv6Address("::")
    except ValueError:
        unspecified_v6 = False
    if not unspecified_v6:
        return await loop.create_server(protocol_factory, host, port)
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return await loop.create_server(protocol_factory, sock=sock)


def _transport_remote(request: aiocoap.Message) -> Any:
    # An OSCORE-protected request's remote wraps the transport's.
    remote = request.remote
    while getattr(remote, "underlying_address", None) is not None:
        remote = remote.underlying_address
    return remote


def _plain_ip(host: str) -> str:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


def _refuse_encrypted_key() -> bytes:
    # Without a password callback OpenSSL would prompt on the terminal and block the server.
    raise ValueError("the TLS private key must not be encrypted")


@contextlib.contextmanager
def _private_file(data: bytes) -> Iterator[str]:
    """A path holding `data` for as long as the block runs, readable by this process only.

    `ssl` loads certificates and keys only from files. A Linux memfd never reaches a disk and
    vanishes with its descriptor; elsewhere a 0600 temporary file lives for the load only.
    """
    fd = _memfd()
    if fd is not None:
        try:
            with open(fd, "wb", closefd=False) as out:
                out.write(data)
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    fd, path = tempfile.mkstemp(prefix="citytwin-tls-", suffix=".pem")  # mode 0600
    try:
        with open(fd, "wb") as out:
            out.write(data)
        yield path
    finally:
        os.unlink(path)


def _memfd() -> int | None:
    if not hasattr(os, "memfd_create") or not os.path.isdir("/proc/self/fd"):
        return None
    try:
        return os.memfd_create("citytwin-tls", os.MFD_CLOEXEC)
    except OSError:  # e.g. a seccomp profile that forbids it
        return None
