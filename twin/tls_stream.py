"""TLS connections driven straight from the event loop, for servers that hold many idle ones.

asyncio's TLS (`loop.start_tls`, `create_server(ssl=...)`) stacks a socket transport, an
`SSLProtocol` with a 256 KiB read buffer, two OpenSSL memory BIOs (whose buffers keep the size
of the largest flight they ever held) and an app transport on every connection. A `TlsStream`
is one small object over a non-blocking `ssl.SSLSocket`: OpenSSL reads and writes the socket
itself, and the stream only reacts to `loop.add_reader`/`add_writer` readiness. Decrypted data
is read into one buffer shared by all streams of a server (`data_received` gets a copy), so an
idle stream owns no buffer at all; OpenSSL's record buffers are released between records
(CPython sets SSL_MODE_RELEASE_BUFFERS). What remains per connection is OpenSSL's own state,
mostly the SSL object and the parsed peer certificate (see twin/coap_tls.py for the numbers).

The stream is asyncio-transport shaped (`write`, `close`, `abort`, `get_extra_info`) so that a
protocol written for asyncio transports can use it, and calls back a `StreamProtocol`:
`tls_established` once the handshake is done, `data_received`, and `connection_lost` exactly
once (without `tls_established` if the handshake failed). It needs a selector event loop
(the default on Unix).

Writes go straight to OpenSSL; what the socket does not take waits in one backlog. While a
backlog waits nothing more is read, so a peer that stops reading its responses stops being
served; a peer that lets the backlog grow past `WRITE_BACKLOG_BYTES` (server-initiated
messages such as notifications pile up there) is aborted. Readiness is watched only for the
direction an operation waits on, so a stalled connection costs no CPU.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from typing import Any, Protocol

# What a peer may leave unread on top of the kernel's socket buffers before it is aborted. A
# single write is always taken whole (its bytes already exist); the limit is on writes that
# pile up behind it.
WRITE_BACKLOG_BYTES = 256 * 1024
# Plaintext bytes one TLS record carries at most; a shared read buffer of this size takes any
# record in one read, so OpenSSL never holds decrypted data the socket's readiness cannot
# announce.
MAX_RECORD_PLAINTEXT = 16 * 1024
# Reads per readiness callback, so that one fast sender cannot starve the other connections.
_READS_PER_CALLBACK = 8

_HANDSHAKE, _OPEN, _CLOSING, _DRAINING, _CLOSED = range(5)


class StreamProtocol(Protocol):
    """What a `TlsStream` calls back."""

    def tls_established(self, stream: TlsStream) -> None:
        """The handshake is done; `stream` may be written to from now on."""

    def data_received(self, data: bytes) -> None:
        """Decrypted bytes from the peer."""

    def connection_lost(self, exc: Exception | None) -> None:
        """The stream is closed (called once, from the event loop, never from inside a call
        to the stream); `exc` is what ended it, None for an orderly or requested close."""


def shared_read_buffer() -> memoryview:
    """A read buffer for the streams of one event loop to share (`TlsStream`'s
    `read_buffer`): one TLS record's worth."""
    return memoryview(bytearray(MAX_RECORD_PLAINTEXT))


class TlsStream:
    """One server-side TLS connection over a non-blocking `ssl.SSLSocket` that has not done
    its handshake yet (`SSLContext.wrap_socket(sock, server_side=True,
    do_handshake_on_connect=False)` of a non-blocking socket).

    `peername` is the peer's address as `accept()` returned it. The handshake starts at once
    and must finish within `handshake_timeout` seconds; `close()` waits at most
    `close_timeout` seconds for the peer's side of the close. `read_buffer` (see
    `shared_read_buffer`) may be shared by all streams of the loop.
    """

    __slots__ = (
        "_backlog",
        "_buffer",
        "_close_timeout",
        "_loop",
        "_peername",
        "_protocol",
        "_reading",
        "_sock",
        "_state",
        "_timer",
        "_want_read",
        "_want_write",
        "_writing",
    )

    def __init__(
        self,
        sock: ssl.SSLSocket,
        loop: asyncio.AbstractEventLoop,
        protocol: StreamProtocol,
        read_buffer: memoryview,
        peername: Any,
        *,
        handshake_timeout: float,
        close_timeout: float,
    ) -> None:
        self._sock = sock
        self._loop = loop
        self._protocol = protocol
        self._buffer = read_buffer
        self._state = _HANDSHAKE
        # Bytes the socket did not take yet; None (not empty) while there are none, so an
        # idle stream keeps no buffer. Its head is what OpenSSL was last asked to write: a
        # retry must hand it the same bytes again (appending is allowed).
        self._backlog: bytearray | None = None
        # The handshake's deadline, later the close's; no timer while open.
        self._timer: asyncio.TimerHandle | None = loop.call_later(handshake_timeout, self._time_out)
        self._close_timeout = close_timeout
        # As accept() gave it: a socket that was reset no longer knows its peer.
        self._peername = peername
        # Which readiness the operation in progress waits for, and what is registered.
        self._want_read = True
        self._want_write = False
        self._reading = False
        self._writing = False
        self._watch()

    # -- the transport side -----------------------------------------------------------------

    @property
    def ssl_object(self) -> ssl.SSLSocket:
        """The TLS socket, for what the handshake established: the peer certificate, the
        ALPN protocol, the version. Reading or writing it directly breaks the stream."""
        return self._sock

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """As asyncio transports answer it, for "ssl_object", "peername" and "sockname"."""
        if name == "ssl_object":
            return self._sock
        if name == "peername":
            return self._peername
        if name == "sockname" and self._state != _CLOSED:
            return self._sock.getsockname()
        return default

    @property
    def backlog_bytes(self) -> int:
        """Bytes written that the socket has not taken yet."""
        return 0 if self._backlog is None else len(self._backlog)

    def is_closing(self) -> bool:
        """Whether `close()` or `abort()` was called or the connection is lost."""
        return self._state >= _CLOSING

    def write(self, data: bytes) -> None:
        """Send `data` once the handshake is done; dropped once the stream is closing."""
        if self._state != _OPEN or not data:
            return
        if self._backlog is not None:
            if len(self._backlog) + len(data) > WRITE_BACKLOG_BYTES:
                self._finish(ConnectionAbortedError("the peer does not read what it is sent"))
                return
            self._backlog += data
            return
        self._send(data)
        if self._backlog is not None:  # blocked: now waiting for the socket, not reading
            self._watch()

    def close(self) -> None:
        """Close in order: send what is queued, then close_notify, then wait (at most
        `close_timeout`) for the peer to close its side. Nothing more is received."""
        if self._state == _HANDSHAKE:
            self._finish(None)
        elif self._state == _OPEN:
            self._state = _CLOSING
            self._set_timer(self._close_timeout)
            self._progress()

    def abort(self) -> None:
        """Close at once, dropping whatever is queued."""
        if self._state != _CLOSED:
            self._finish(None)

    # -- readiness --------------------------------------------------------------------------

    def _progress(self) -> None:
        """Do whatever the connection's state allows now; called on either readiness."""
        try:
            self._step()
        except Exception as exc:
            # As asyncio's transports do: a connection whose protocol (or this code) failed is
            # closed rather than left half-served.
            self._loop.call_exception_handler(
                {"message": "TLS stream failed", "exception": exc, "protocol": self._protocol}
            )
            if self._state != _CLOSED:
                self._finish(exc)

    def _step(self) -> None:
        self._want_read = self._want_write = False
        if self._state == _HANDSHAKE:
            self._handshake()
        if self._state in (_OPEN, _CLOSING) and self._backlog is not None:
            self._send(self._backlog)
        if self._state == _OPEN and self._backlog is None:
            self._read()
        if self._state == _CLOSING and self._backlog is None:
            self._send_close_notify()
        if self._state == _DRAINING:
            self._drain()
        self._watch()

    def _handshake(self) -> None:
        try:
            self._sock.do_handshake()
        except ssl.SSLWantReadError:
            self._want_read = True
            return
        except ssl.SSLWantWriteError:
            self._want_write = True
            return
        except OSError as exc:  # ssl.SSLError (e.g. an untrusted certificate), resets, EOF
            self._finish(exc)
            return
        self._set_timer(None)
        self._state = _OPEN
        self._protocol.tls_established(self)

    def _read(self) -> None:
        for _ in range(_READS_PER_CALLBACK):
            try:
                count = self._sock.recv_into(self._buffer)
            except ssl.SSLWantReadError:
                self._want_read = True
                return
            except ssl.SSLWantWriteError:  # OpenSSL must answer something first
                self._want_write = True
                return
            except OSError as exc:
                self._finish(exc)
                return
            if count == 0:
                self._peer_closed()
                return
            self._protocol.data_received(bytes(self._buffer[:count]))
            if self._state != _OPEN or self._backlog is not None:
                return  # closed by the protocol, or back-pressure: read on once written
        # More may be waiting; the socket's readiness says so unless OpenSSL holds it.
        if self._sock.pending():
            self._loop.call_soon(self._progress)
        else:
            self._want_read = True

    def _send(self, data: bytes | bytearray) -> None:
        waits_for_read = False
        try:
            sent = self._sock.send(data)
        except ssl.SSLWantWriteError:
            sent = 0
        except ssl.SSLWantReadError:  # OpenSSL must read something first
            sent, waits_for_read = 0, True
        except OSError as exc:
            self._finish(exc)
            return
        if sent == len(data):
            self._backlog = None
            return
        if data is self._backlog:
            del data[:sent]
        else:
            self._backlog = bytearray(memoryview(data)[sent:])
        # Nothing more is read until the backlog is out: back-pressure.
        self._want_read, self._want_write = waits_for_read, not waits_for_read

    def _peer_closed(self) -> None:
        # The peer's close_notify (or a bare FIN): answer it if the socket takes it, and go.
        # Failing means its close_notify did not come or the socket is already gone.
        with contextlib.suppress(OSError):
            self._sock.unwrap()
        self._finish(None)

    def _send_close_notify(self) -> None:
        try:
            self._sock.unwrap()  # sends close_notify; returns if the peer's is already in
        except ssl.SSLWantReadError:
            pass  # ours is sent; theirs may still come
        except ssl.SSLWantWriteError:
            self._want_write = True
            return
        except OSError:
            self._finish(None)
            return
        try:
            # A FIN after close_notify; the socket is plain TCP from here on.
            self._sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._finish(None)
            return
        self._state = _DRAINING

    def _drain(self) -> None:
        # Until the peer closes too: closing with unread bytes would send a reset, which can
        # make the peer drop what we sent last.
        for _ in range(_READS_PER_CALLBACK):
            try:
                if self._sock.recv_into(self._buffer) == 0:
                    break
            except (BlockingIOError, InterruptedError):
                self._want_read = True
                return
            except OSError:
                break
        else:
            self._want_read = True
            return
        self._finish(None)

    def _time_out(self) -> None:
        self._timer = None
        if self._state == _HANDSHAKE:
            self._finish(TimeoutError("TLS handshake timed out"))
        else:
            self._finish(None)

    def _finish(self, exc: Exception | None) -> None:
        self._state = _CLOSED
        self._set_timer(None)
        self._want_read = self._want_write = False
        self._watch()
        self._backlog = None
        self._sock.close()
        # Never from inside a call the protocol made (a write, a close).
        self._loop.call_soon(self._protocol.connection_lost, exc)

    def _set_timer(self, seconds: float | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = None if seconds is None else self._loop.call_later(seconds, self._time_out)

    def _watch(self) -> None:
        """Register for exactly the readiness the current operation waits for."""
        if self._want_read != self._reading:
            if self._want_read:
                self._loop.add_reader(self._sock.fileno(), self._progress)
            else:
                self._loop.remove_reader(self._sock.fileno())
            self._reading = self._want_read
        if self._want_write != self._writing:
            if self._want_write:
                self._loop.add_writer(self._sock.fileno(), self._progress)
            else:
                self._loop.remove_writer(self._sock.fileno())
            self._writing = self._want_write
