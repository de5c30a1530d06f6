"""CoAP over TLS (RFC 8323, `coaps+tcp`) for devices, on top of aiocoap's TLS transport.

This is the only module that touches aiocoap's private TLS internals: it subclasses
`aiocoap.transports.tls.TLSServer` and `aiocoap.transports.tcp.TcpConnection`, reads and sets
their private attributes (`_transport`, `_spool`, `_pool`, `_tokenmanager`, `_ctx`,
`_local_hostinfo`, `_remote_hostinfo`), calls `_send_message` and `release`, hands
`TcpConnection.connection_made` a `TlsStream` in place of an asyncio transport, replaces
`TCPServer.shutdown` and `_TCPPooling._dispatch_incoming`/`_dispatch_error` (reading the token
manager's `incoming_requests` and `outgoing_requests`), and registers the transport with
`Context._append_tokenmanaged_transport`. None of that is a stable API, which is why
pyproject.toml pins aiocoap to 0.4.17; an upgrade must re-check this module, and
tests/twin/test_coap_tls.py exercises every hook. Everything else uses the functions here.

What it adds to aiocoap's own `tlsserver` transport:

* The port is bound as given. aiocoap's `TCPServer.create_server` adds COAPS_PORT - COAP_PORT
  to a TLS bind port; port 0 (ephemeral) works and the bound port is `TlsListener.port`.
  `::` listens dual-stack on one socket (as aiocoap's UDP transport does), where asyncio would
  listen on IPv6 only.
* A connection cap. Connections are accepted here, so one beyond `max_connections` is closed
  before any TLS work.
* A handshake cap: at most `max_handshakes` TLS handshakes run at once, the rest wait in the
  listen backlog. Thousands of devices reconnecting at once (a restart, a district's network
  coming back) then get through in arrival order at the server's full rate, instead of all
  advancing together until every handshake has outlived its timeout (bench/reconnects.py).
* Losing a connection ends that connection's requests (its observations) without walking every
  request of the server, as aiocoap 0.4.17 does (see `_TlsServer._dispatch_error`): a mass
  disconnect costs O(N), not O(N^2).
* One TLS 1.3 session ticket per handshake instead of OpenSSL's two (`server_ssl_context`).
* An idle timeout: a connection that completes no CoAP message (a Ping counts) for
  `idle_timeout` seconds gets a Release and is closed, at the latest a quarter of
  `idle_timeout` later (one sweep over all connections finds them). Devices that only wait for
  Observe notifications must ping more often than that. The TLS handshake is bounded by it too.
* The client certificate of each connection (`peer_certificate`), which aiocoap does not hand
  to resources (`authenticated_claims` stays empty on TLS).
* Back-pressure: while a device leaves its responses unread, nothing more is read from it, and
  one that lets more than `tls_stream.WRITE_BACKLOG_BYTES` pile up is aborted (aiocoap
  ignores pause_writing, so asyncio would buffer without bound).
* `context.shutdown()` closes the connections too; aiocoap only sends them a Release.

For clients (devices, tests), `client_ssl_context` and `device_client_context` give an aiocoap
client that presents a client certificate, which aiocoap's credentials map cannot express.

Memory per connected, observing device (bench/connections.py, 1,000 devices, OpenSSL 3.0,
P-256 device certificates): aiocoap's own TLS transport 308 KiB (asyncio's TLS protocol with
its fixed 256 KiB read buffer, two OpenSSL memory BIOs, the peer certificate parsed into a
dict); ours ~29 KiB for a device that sends only its own certificate, ~39 KiB for one that
sends its whole chain (the server keeps every certificate it receives parsed, ~5 KiB each, so
device firmware should present only its own; `client_ssl_context` sees to that for our
clients). Connections are `twin.tls_stream.TlsStream`s (one small object over an
`ssl.SSLSocket`, one read buffer per listener, no timer per connection) and observations
`twin.pipe_observations.PipeObservation`s (no task per observer). Of the ~29 KiB, ~9 KiB are
Python objects (mostly aiocoap's per-request pipes and messages) and ~20 KiB OpenSSL's
per-connection state, which the `ssl` module cannot trim: the SSL object (~8.5 KiB), the
parsed device certificate (~5 KiB), cipher contexts. TLS session-ticket settings make no
difference to it. `max_connections` bounds the total.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import logging
import os
import socket
import ssl
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import aiocoap
import aiocoap.error
import aiocoap.util
from aiocoap.numbers.codes import RELEASE
from aiocoap.transports.tcp import TcpConnection
from aiocoap.transports.tls import TLSServer
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from twin.tls_stream import TlsStream, shared_read_buffer

log = logging.getLogger(__name__)

ALPN_COAP = "coap"  # RFC 8323 section 4.1
# A client that has not finished its handshake by then is holding a connection slot for nothing.
MAX_HANDSHAKE_SECONDS = 10.0
# TLS handshakes in progress at once; further connections wait in the kernel's listen backlog
# until one finishes. When thousands of devices reconnect at once (a restart, a district's
# network coming back), handshakes all admitted together advance in lockstep on the one event
# loop and finish together: at ~2.5 ms of server CPU each, 4,000 take longer than
# MAX_HANDSHAKE_SECONDS, so every one of them timed out and the devices retried, for ever.
# Admitted a bounded number at a time they finish in arrival order at the server's full rate.
# The bound is what keeps that rate up over slow links: a handshake holds its slot for at
# least a round trip (256 at a 1 s RTT: 256 handshakes/s, the server's rate on one core).
MAX_CONCURRENT_HANDSHAKES = 256
# TLS 1.3 session tickets sent after a full handshake (see server_ssl_context).
SESSION_TICKETS = 1
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
    # OpenSSL sends two TLS 1.3 session tickets after every handshake (so that a client can
    # open two connections from them); each carries the client certificate, encrypted, and
    # the pair costs ~40% of a full handshake's server CPU (0.4 of 1.0 ms, OpenSSL 3.0). A
    # device holds one connection, and a resumed one is handed a fresh ticket, so one is
    # enough to resume with (bench/reconnects.py measures the storm a restart causes).
    context.num_tickets = SESSION_TICKETS
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
    if cert_pem is not None:
        # OpenSSL completes a client's chain from its trust store and sends it all; the server
        # then keeps every certificate parsed for the life of the connection (~5 KiB each).
        # Trusting only the roots leaves nothing to complete it with, so the device sends just
        # its own certificate (the server sends its intermediate, so the roots suffice).
        trust = _roots(trust_pem) or trust
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=trust)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols([ALPN_COAP])
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    if cert_pem is not None and key_pem is not None:
        with _private_file(cert_pem.rstrip(b"\n") + b"\n" + key_pem) as path:
            context.load_cert_chain(path, password=_refuse_encrypted_key)
    return context


def _roots(pem: bytes) -> str:
    """The self-signed certificates among `pem`'s, as PEM ("" if there are none)."""
    try:
        certificates = x509.load_pem_x509_certificates(pem)
    except ValueError:
        return ""
    return "".join(
        c.public_bytes(serialization.Encoding.PEM).decode("ascii")
        for c in certificates
        if c.issuer == c.subject
    )


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
    def handshaking_connections(self) -> int:
        """Connections accepted whose TLS handshake is still in progress."""
        return self._server.handshakes

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
    max_handshakes: int = MAX_CONCURRENT_HANDSHAKES,
) -> TlsListener:
    """Serve `coaps+tcp` on `host`:`port` (0: an ephemeral port) for the site of `context`,
    an aiocoap server context such as `Context.create_server_context(site, bind=...,
    transports=["udp6"])`.

    At most `max_connections` are open at once (further ones are closed at accept); one that
    completes no CoAP message for `idle_timeout` seconds is released and closed, and a TLS
    handshake may take at most the smaller of `idle_timeout` and `handshake_timeout`. At most
    `max_handshakes` handshakes run at once: while that many are in progress, no connection
    is accepted (they wait in the listen backlog, in arrival order).
    `context.shutdown()` stops the listener and closes its connections. (A host name with
    several addresses gets a socket each; with port 0 those ports differ and `port` is the
    first one's. Give an address to avoid that.)

    Raises `ValueError` for a non-positive limit and `OSError` if the address cannot be bound.
    """
    if max_connections < 1:
        raise ValueError(f"max_connections must be at least 1, not {max_connections}")
    if max_handshakes < 1:
        raise ValueError(f"max_handshakes must be at least 1, not {max_handshakes}")
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
            max_handshakes=max_handshakes,
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

# The largest CoAP message a device may send in one piece (a 64 KiB report plus headers).
MAX_MESSAGE_BYTES = 72 * 1024
# Idle connections are found by one sweep over all of them this many times per idle_timeout
# (so one is closed between 1 and 1.25 idle_timeouts after its last message), rather than by a
# timer per connection, which would cost every connection a timer handle.
_IDLE_SWEEPS_PER_TIMEOUT = 4
# Connections accepted per readiness callback of a listening socket, so that a connection storm
# cannot starve the open connections.
_ACCEPTS_PER_CALLBACK = 64
# After running out of file descriptors (or kernel memory), accepting pauses this long instead
# of spinning on a listening socket that stays readable.
_ACCEPT_RETRY_SECONDS = 1.0
# A connection's list of request tokens is pruned of finished requests once it holds this
# many (or twice as many as after the last pruning).
_TOKENS_PRUNE_MIN = 16


class _TlsServer(TLSServer):  # type: ignore[misc]
    """aiocoap's TLS server transport, with its own listening sockets, accept path and
    connections (`TlsStream`s instead of asyncio's TLS transport)."""

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
        max_handshakes: int,
    ) -> None:
        super().__init__()
        self._tokenmanager = token_manager
        self.log = coap_log
        self.loop = loop
        self.ssl_context = ssl_context
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.handshake_timeout = handshake_timeout
        self.max_handshakes = max_handshakes
        # Connections accepted and not yet past (or failed in) their handshake.
        self.handshakes = 0
        self.port = 0
        self.refused = 0
        self.idle_closed = 0
        self.failed_handshakes = 0
        # Every accepted connection until it is lost, handshaking ones included; aiocoap's
        # `_pool` holds only those past the handshake, which are the ones it may send on.
        self.connections: set[_TlsConnection] = set()
        self.closing = False
        # What every connection decrypts is read into this one buffer: connections own none.
        self.read_buffer = shared_read_buffer()
        self._sockets: list[socket.socket] = []
        self._sweep_timer: asyncio.TimerHandle | None = None
        self._accept_timer: asyncio.TimerHandle | None = None
        # Whether the listening sockets are watched (not while max_handshakes are running,
        # nor while pausing after an accept error).
        self._accepting = False
        self._all_lost = asyncio.Event()
        self._all_lost.set()
        self._cap_logged = False

    async def listen(self, host: str, port: int) -> None:
        self._sockets = await _listening_sockets(self.loop, host, port)
        self.port = int(self._sockets[0].getsockname()[1])
        self._accept_on()
        self._sweep_timer = self.loop.call_later(self._sweep_interval, self._sweep)

    @property
    def _sweep_interval(self) -> float:
        return self.idle_timeout / _IDLE_SWEEPS_PER_TIMEOUT

    def _accept_on(self) -> None:
        self._accept_timer = None
        if self._accepting or self.closing or self.handshakes >= self.max_handshakes:
            return
        self._accepting = True
        for listener in self._sockets:
            self.loop.add_reader(listener.fileno(), self._accept, listener)

    def _accept_off(self) -> None:
        if self._accepting:
            self._accepting = False
            for listener in self._sockets:
                self.loop.remove_reader(listener.fileno())

    def _accept(self, listener: socket.socket) -> None:
        for _ in range(_ACCEPTS_PER_CALLBACK):
            if self.handshakes >= self.max_handshakes:
                # The rest wait in the listen backlog; a finished handshake resumes accepting.
                self._accept_off()
                return
            try:
                sock, address = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:  # gone before it was accepted
                continue
            except OSError as exc:
                # Out of descriptors or memory: the socket stays readable, so stop watching it
                # for a while rather than spin.
                log.error("coaps+tcp: accepting failed (%s); pausing for a second", exc)
                self._accept_off()
                self._accept_timer = self.loop.call_later(_ACCEPT_RETRY_SECONDS, self._accept_on)
                return
            self._admit(sock, address)

    def _admit(self, sock: socket.socket, address: Any) -> None:
        """Take a freshly accepted TCP connection into a TLS handshake, or refuse it."""
        if self.closing or len(self.connections) >= self.max_connections:
            sock.close()
            self.refused += 1
            if not self._cap_logged and not self.closing:
                log.warning(
                    "coaps+tcp: %d connections open; refusing new ones", self.max_connections
                )
                self._cap_logged = True
            return
        try:
            sock.setblocking(False)
            # CoAP messages are small and each wants an answer: Nagle's delay would hold them.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            tls = self.ssl_context.wrap_socket(
                sock, server_side=True, do_handshake_on_connect=False
            )
        except OSError as exc:  # the peer is already gone
            log.debug("coaps+tcp: connection lost before its handshake: %s", exc)
            sock.close()
            self.failed_handshakes += 1
            return
        connection = _TlsConnection(self)
        self.connections.add(connection)
        self.handshakes += 1
        self._all_lost.clear()
        connection.stream = TlsStream(
            tls,
            self.loop,
            connection,
            self.read_buffer,
            address,
            handshake_timeout=self.handshake_timeout,
            close_timeout=_TLS_CLOSE_SECONDS,
        )

    def handshake_over(self) -> None:
        """A connection's handshake finished or failed: its slot is free for another."""
        self.handshakes -= 1
        if not self._accepting and self._accept_timer is None:
            self._accept_on()

    def forget(self, connection: _TlsConnection, exc: Exception | None) -> None:
        """`connection` is lost; count it as a failed handshake if it never got past one."""
        self.connections.discard(connection)
        if not self.connections:
            self._all_lost.set()
        if len(self.connections) < self.max_connections:
            self._cap_logged = False
        connection.end_handshake()
        if not connection.established and not self.closing:
            log.debug("coaps+tcp: TLS handshake failed: %s", exc)
            self.failed_handshakes += 1

    def _sweep(self) -> None:
        idle_since = self.loop.time() - self.idle_timeout
        idle = [c for c in self.connections if c.idle_since(idle_since)]
        for connection in idle:
            self.idle_closed += 1
            connection.release_idle()
        self._sweep_timer = self.loop.call_later(self._sweep_interval, self._sweep)

    async def shutdown(self) -> None:
        # aiocoap's TCPServer.shutdown, for our listening sockets, and then closing the
        # connections it only sends a Release on.
        self.closing = True
        self._tokenmanager = None
        for timer in (self._sweep_timer, self._accept_timer):
            if timer is not None:
                timer.cancel()
        self._accept_off()
        for listener in self._sockets:
            listener.close()
        open_ones = list(self.connections)
        released = [c for c in open_ones if c in self._pool]
        if released:
            await asyncio.gather(*(c.release() for c in released))
        for connection in open_ones:
            connection.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._all_lost.wait(), _SHUTDOWN_GRACE_SECONDS)
        for connection in list(self.connections):
            connection.abort_transport()
        # Aborted connections report their loss on the next loop iteration.
        await self._all_lost.wait()

    # -- aiocoap 0.4.17 workaround: a lost connection's requests, found per connection -------
    #
    # aiocoap ends the requests of a lost connection in `TokenManager.dispatch_error`, which
    # walks every incoming (and outgoing) request of the whole server to find the ones whose
    # remote is that connection. A server holds one observation per device, so when N devices
    # go at once (a district's network fails) that is N walks over up to N requests: O(N^2),
    # ~1 s of CPU at 4,000 devices during which nothing else is served, and growing with the
    # square. Here each connection keeps the tokens of its own requests (`request_tokens`),
    # and losing it ends exactly those. Everything else dispatch_error does is kept: outgoing
    # requests to the connection (a server rarely has any) still fail with a NetworkError.
    # Only `_dispatch_incoming` and `_dispatch_error` of `_TCPPooling` are overridden, for
    # this transport only; an aiocoap upgrade must re-check both against TokenManager's
    # `process_request` and `dispatch_error` (tests/twin/test_coap_tls.py has a test that
    # counts the requests a disconnect visits).

    def _dispatch_incoming(self, connection: _TlsConnection, msg: aiocoap.Message) -> None:
        super()._dispatch_incoming(connection, msg)
        # As _TCPPooling does: everything that is not a response goes to process_request,
        # which files it in incoming_requests under (token, connection).
        if not msg.code.is_response() and self._tokenmanager is not None:
            connection.note_request(msg.token, self._tokenmanager.incoming_requests)

    def _dispatch_error(self, connection: _TlsConnection, exc: Exception | None) -> None:
        self._evict_from_pool(connection)
        manager = self._tokenmanager
        if manager is None or manager.outgoing_requests is None:
            # Shut down, or shutting down: nothing is left to end (as in aiocoap).
            if exc is not None:
                self.log.debug("Ignoring late error during shutdown: %s", exc)
            return
        # What TokenManager.dispatch_error hands requesters: a NetworkError.
        error = exc
        if not isinstance(error, aiocoap.error.NetworkError):
            error = aiocoap.error.NetworkError(str(exc))
            error.__cause__ = exc
        # Collected first and called after: each call takes its entry out of these dicts.
        stoppers: list[Callable[[], object]] = [
            functools.partial(request.add_exception, error)
            for (_, remote), request in manager.outgoing_requests.items()
            if remote == connection
        ]
        incoming = manager.incoming_requests
        for token in dict.fromkeys(connection.take_request_tokens()):
            entry = incoming.get((token, connection))
            if entry is not None:
                stoppers.append(entry[1])
        for stop in stoppers:
            stop()


class _TlsConnection(TcpConnection):  # type: ignore[misc]
    """One device connection: aiocoap's, plus its TLS stream, its certificate and the time of
    its last complete message. aiocoap's `_transport` is the stream once the handshake is
    done."""

    # Announced in our CSM (RFC 8323 Max-Message-Size) and enforced on receipt; aiocoap's
    # 1 MiB would let every connection hold a megabyte before any resource can refuse it.
    # Larger bodies go block-wise (which resources bound themselves).
    _my_max_message_size = MAX_MESSAGE_BYTES

    def __init__(self, server: _TlsServer) -> None:
        super().__init__(server, server.log, server.loop, is_server=True)
        # Only the DER leaf: OpenSSL keeps its own parsed copy for as long as the connection.
        self.peer_certificate: bytes | None = None
        self.last_message = server.loop.time()
        self.stream: TlsStream | None = None  # set right after, by the server
        # Whether it holds one of the server's max_handshakes slots.
        self.handshaking = True
        # Tokens of the requests received on this connection that may still be in aiocoap's
        # token manager, so that losing the connection need not scan every request of the
        # server (see _TlsServer._dispatch_error); pruned as it grows.
        self.request_tokens: list[bytes] = []
        self._prune_at = _TOKENS_PRUNE_MIN
        # aiocoap's connection_made sets these. Python gives instances a compact dict only for
        # attributes first set in __init__; one first set later costs every connection a dict
        # of its own (~0.7 KiB).
        self._local_hostinfo: tuple[str, int | None] | None = None
        self._remote_hostinfo: tuple[str, int | None] | None = None

    @property
    def established(self) -> bool:
        """Whether the TLS handshake is done (and aiocoap has the connection)."""
        return self._transport is not None

    @property
    def peer_host(self) -> str:
        """The peer's IP address as the socket gave it ("" before the handshake is done)."""
        hostinfo = self._remote_hostinfo
        return "" if hostinfo is None else hostinfo[0]

    def tls_established(self, stream: TlsStream) -> None:
        self.end_handshake()
        self.peer_certificate = stream.ssl_object.getpeercert(binary_form=True)
        # aiocoap's connection_made: addresses from the stream, then our CSM.
        super().connection_made(stream)
        self._ctx._pool.add(self)
        self.last_message = self.loop.time()

    def end_handshake(self) -> None:
        """Give the connection's handshake slot back (once, however the handshake ended)."""
        if self.handshaking:
            self.handshaking = False
            self._ctx.handshake_over()

    def data_received(self, data: bytes) -> None:
        if self._ctx.closing:
            return  # the token manager is gone; nothing could handle a request now
        expected = len(self._spool) + len(data)
        super().data_received(data)
        # The spool shrinks only when a complete message was taken off it.
        if len(self._spool) < expected:
            self.last_message = self.loop.time()

    def connection_lost(self, exc: Exception | None) -> None:
        self._ctx.forget(self, exc)
        if self._transport is not None:
            super().connection_lost(exc)

    def note_request(self, token: bytes, incoming: dict[Any, Any]) -> None:
        """Remember a request received on this connection, which aiocoap keeps in `incoming`
        (its token manager's incoming_requests) under (token, this connection) until it is
        done. Tokens of finished requests are dropped whenever the list has doubled since the
        last pruning, so a connection that sends request after request keeps a short list."""
        tokens = self.request_tokens
        tokens.append(token)
        if len(tokens) >= self._prune_at:
            tokens[:] = [t for t in dict.fromkeys(tokens) if (t, self) in incoming]
            self._prune_at = max(_TOKENS_PRUNE_MIN, 2 * len(tokens))

    def take_request_tokens(self) -> list[bytes]:
        """The tokens noted so far (some of finished requests), forgetting them."""
        tokens, self.request_tokens = self.request_tokens, []
        return tokens

    def idle_since(self, moment: float) -> bool:
        """Whether the connection is open and has completed no message since `moment`."""
        return self.established and not self._transport.is_closing() and self.last_message < moment

    def release_idle(self) -> None:
        """Release and close the connection for being idle."""
        log.debug("coaps+tcp: closing idle connection from %s", self.peer_host)
        self._send_message(aiocoap.Message(code=RELEASE))
        self.close()

    def close(self) -> None:
        """Close the connection in order (queued messages first); one still in its handshake
        is dropped."""
        if self.stream is not None:
            self.stream.close()

    def abort_transport(self) -> None:
        """Close the connection at once."""
        if self.stream is not None:
            self.stream.abort()


# -- helpers ---------------------------------------------------------------------------------


async def _listening_sockets(
    loop: asyncio.AbstractEventLoop, host: str, port: int
) -> list[socket.socket]:
    """Non-blocking listening sockets for every address of `host`, as asyncio's create_server
    binds them, except that `::` listens dual-stack (as aiocoap's UDP transport does) where
    asyncio would listen on IPv6 only."""
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                dual_stack = address[0] == "::"
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(not dual_stack))
            sock.bind(address)
            # A whole street of lamps reconnects at once after an outage or a restart.
            sock.listen(socket.SOMAXCONN)
            sock.setblocking(False)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


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
