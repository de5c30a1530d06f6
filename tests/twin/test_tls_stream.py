"""`twin.tls_stream.TlsStream` on 127.0.0.1, against asyncio TLS clients: handshake outcomes,
data both ways through the shared read buffer, back-pressure against a peer that does not
read, orderly and forced closes, timeouts, and no spinning while a connection waits."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from provisioning.certificate_authority import create_fleet_ca, issue_server_certificate
from twin import tls_stream
from twin.coap_tls import client_ssl_context, server_ssl_context
from twin.tls_stream import TlsStream, shared_read_buffer

PEM = serialization.Encoding.PEM
# Small socket buffers on both ends, so that a peer that does not read stalls writes quickly.
SMALL_BUFFER = 4096


@dataclass(frozen=True)
class Tls:
    server: ssl.SSLContext
    client: ssl.SSLContext
    client_trust: bytes  # what `client` trusts (PEM)
    stranger: ssl.SSLContext  # trusts another CA: refuses the server's certificate


@pytest.fixture(scope="module")
def tls() -> Tls:
    fleet, _ = create_fleet_ca("tls stream test")
    key = ec.generate_private_key(ec.SECP256R1())
    cert = issue_server_certificate(
        fleet, key.public_key(), dns_names=[], ip_addresses=["127.0.0.1"]
    )
    key_pem = key.private_bytes(
        PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    chain = cert.public_bytes(PEM) + fleet.issuing_cert.public_bytes(PEM)
    other, _ = create_fleet_ca("someone else")
    return Tls(
        server=server_ssl_context(chain, key_pem, []),
        client=client_ssl_context(fleet.chain_pem()),
        client_trust=fleet.chain_pem(),
        stranger=client_ssl_context(other.chain_pem()),
    )


@dataclass
class Recorder:
    """A StreamProtocol that keeps what happened."""

    stream: TlsStream | None = None
    received: bytearray = field(default_factory=bytearray)
    lost: asyncio.Future[Exception | None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    lost_calls: int = 0
    on_data: Callable[[bytes], None] | None = None

    def tls_established(self, stream: TlsStream) -> None:
        self.stream = stream

    def data_received(self, data: bytes) -> None:
        self.received += data
        if self.on_data is not None:
            self.on_data(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost_calls += 1
        self.lost.set_result(exc)


@dataclass
class Listener:
    port: int
    accepted: asyncio.Queue[tuple[Recorder, TlsStream]]


@contextlib.asynccontextmanager
async def listening(
    tls: Tls,
    *,
    handshake_timeout: float = 5.0,
    close_timeout: float = 2.0,
    small_buffers: bool = False,
) -> AsyncIterator[Listener]:
    """A listening socket whose connections each get a TlsStream and a Recorder."""
    loop = asyncio.get_running_loop()
    server = socket.create_server(("127.0.0.1", 0))
    server.setblocking(False)
    buffer = shared_read_buffer()
    accepted: asyncio.Queue[tuple[Recorder, TlsStream]] = asyncio.Queue()
    streams: list[TlsStream] = []

    def accept() -> None:
        sock, address = server.accept()
        sock.setblocking(False)
        if small_buffers:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL_BUFFER)
        wrapped = tls.server.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        recorder = Recorder()
        stream = TlsStream(
            wrapped,
            loop,
            recorder,
            buffer,
            address,
            handshake_timeout=handshake_timeout,
            close_timeout=close_timeout,
        )
        streams.append(stream)
        accepted.put_nowait((recorder, stream))

    loop.add_reader(server.fileno(), accept)
    try:
        yield Listener(server.getsockname()[1], accepted)
    finally:
        loop.remove_reader(server.fileno())
        server.close()
        for stream in streams:
            stream.abort()


async def connect(
    port: int, context: ssl.SSLContext, *, small_buffers: bool = False
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    sock = socket.socket()
    if small_buffers:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_BUFFER)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return await asyncio.wait_for(
        asyncio.open_connection(sock=sock, ssl=context, server_hostname="127.0.0.1"), 5
    )


async def established(listener: Listener) -> tuple[Recorder, TlsStream]:
    recorder, stream = await asyncio.wait_for(listener.accepted.get(), 5)
    deadline = time.monotonic() + 5
    while recorder.stream is None and not recorder.lost.done():
        assert time.monotonic() < deadline, "no handshake"
        await asyncio.sleep(0.005)
    return recorder, stream


def transport_of(writer: asyncio.StreamWriter) -> asyncio.Transport:
    transport = writer.transport
    assert isinstance(transport, asyncio.Transport)
    return transport


async def stall(stream: TlsStream, writer: asyncio.StreamWriter) -> None:
    """Make the peer stop reading and write until the socket stops taking data."""
    transport_of(writer).pause_reading()
    # asyncio's TLS layer would otherwise go on reading up to 256 KiB for the paused reader
    # (its TLS transport has this method; typeshed's Transport does not).
    transport_of(writer).set_read_buffer_limits(high=SMALL_BUFFER)  # type: ignore[attr-defined]
    while True:
        if stream.backlog_bytes == 0:
            stream.write(b"x" * 32768)
        # Still waiting after a while: the buffers on the way are full.
        await asyncio.sleep(0.05)
        if stream.backlog_bytes:
            return


async def eventually(check: Callable[[], bool], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


async def test_data_both_ways_arrives_whole_and_in_order(tls: Tls) -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB, far more than a record or the read buffer
    async with listening(tls, small_buffers=True) as listener:
        reader, writer = await connect(listener.port, tls.client, small_buffers=True)
        recorder, stream = await established(listener)
        assert stream.ssl_object.selected_alpn_protocol() == "coap"
        assert stream.get_extra_info("peername") == writer.get_extra_info("sockname")
        reading = asyncio.create_task(reader.readexactly(len(payload)))
        writer.write(payload)
        for offset in range(0, len(payload), 50_000):
            # A writer that waits for the backlog to go (as one waiting for replies does).
            await eventually(lambda: stream.backlog_bytes == 0)
            stream.write(payload[offset : offset + 50_000])
        assert await asyncio.wait_for(reading, 10) == payload
        await eventually(lambda: len(recorder.received) == len(payload))
        assert recorder.received == payload
        writer.close()
        assert await asyncio.wait_for(recorder.lost, 5) is None
    assert recorder.lost_calls == 1


async def test_connections_share_one_read_buffer_without_mixing_data(tls: Tls) -> None:
    async with listening(tls) as listener:
        clients = [await connect(listener.port, tls.client) for _ in range(2)]
        recorders = [(await established(listener))[0] for _ in clients]
        chunks = [bytes([i]) * 40_000 for i in range(2)]
        for (_, writer), chunk in zip(clients, chunks, strict=True):
            writer.write(chunk)
        await eventually(lambda: all(len(r.received) == 40_000 for r in recorders))
        assert sorted(bytes(r.received) for r in recorders) == chunks
        for _, writer in clients:
            writer.close()


async def test_an_untrusting_peer_fails_the_handshake(tls: Tls) -> None:
    async with listening(tls) as listener:
        with pytest.raises(ssl.SSLError):
            await connect(listener.port, tls.stranger)
        recorder, _ = await asyncio.wait_for(listener.accepted.get(), 5)
        assert isinstance(await asyncio.wait_for(recorder.lost, 5), OSError)
        assert recorder.stream is None  # tls_established never came


async def test_a_silent_peer_times_the_handshake_out(tls: Tls) -> None:
    async with listening(tls, handshake_timeout=0.2) as listener:
        reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
        recorder, _ = await asyncio.wait_for(listener.accepted.get(), 5)
        assert isinstance(await asyncio.wait_for(recorder.lost, 2), TimeoutError)
        assert await asyncio.wait_for(reader.read(), 2) == b""
        writer.close()


async def test_close_sends_what_is_queued_then_closes_in_order(tls: Tls) -> None:
    async with listening(tls) as listener:
        reader, writer = await connect(listener.port, tls.client)
        recorder, stream = await established(listener)
        stream.write(b"last words")
        stream.close()
        stream.write(b"dropped")  # nothing is sent once closing
        assert stream.is_closing()
        assert await asyncio.wait_for(reader.read(), 5) == b"last words"  # then close_notify
        writer.close()
        assert await asyncio.wait_for(recorder.lost, 5) is None
        assert stream.get_extra_info("sockname") is None


async def test_close_gives_up_on_a_peer_that_never_closes(tls: Tls) -> None:
    async with listening(tls, close_timeout=0.2) as listener:
        _, writer = await connect(listener.port, tls.client)
        recorder, stream = await established(listener)
        transport_of(writer).pause_reading()  # never sees our close_notify, never answers
        started = time.monotonic()
        stream.close()
        assert await asyncio.wait_for(recorder.lost, 2) is None
        assert 0.15 < time.monotonic() - started < 1.5
        writer.close()


async def test_a_reset_peer_is_lost(tls: Tls) -> None:
    async with listening(tls) as listener:
        _, writer = await connect(listener.port, tls.client)
        recorder, _ = await established(listener)
        writer.transport.abort()
        await asyncio.wait_for(recorder.lost, 5)
    assert recorder.lost_calls == 1


async def test_a_peer_that_does_not_read_stops_being_read_then_is_aborted(
    tls: Tls, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tls_stream, "WRITE_BACKLOG_BYTES", 64 * 1024)
    async with listening(tls, small_buffers=True) as listener:
        _, writer = await connect(listener.port, tls.client, small_buffers=True)
        recorder, stream = await established(listener)
        await stall(stream, writer)
        # While writes wait, what the peer sends is left in the socket (back-pressure)...
        writer.write(b"request")
        await asyncio.sleep(0.2)
        assert recorder.received == b""
        # ...and writes that pile up past the limit end the connection.
        while not stream.is_closing():
            assert stream.backlog_bytes <= tls_stream.WRITE_BACKLOG_BYTES
            stream.write(b"y" * 8192)
        assert isinstance(await asyncio.wait_for(recorder.lost, 5), ConnectionAbortedError)
        writer.close()


async def test_a_peer_that_reads_again_is_served_again(tls: Tls) -> None:
    async with listening(tls, small_buffers=True) as listener:
        _, writer = await connect(listener.port, tls.client, small_buffers=True)
        recorder, stream = await established(listener)
        await stall(stream, writer)
        writer.write(b"request")
        transport_of(writer).resume_reading()
        await eventually(lambda: recorder.received == b"request")
        assert stream.backlog_bytes == 0
        writer.close()
        assert await asyncio.wait_for(recorder.lost, 5) is None


async def test_a_stalled_connection_does_not_spin(
    tls: Tls, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = 0
    progress = TlsStream._progress

    def counted(self: TlsStream) -> None:
        nonlocal calls
        calls += 1
        progress(self)

    monkeypatch.setattr(TlsStream, "_progress", counted)
    async with listening(tls, small_buffers=True) as listener:
        _, writer = await connect(listener.port, tls.client, small_buffers=True)
        _, stream = await established(listener)
        await stall(stream, writer)
        # Unwritable with data waiting to be read: neither readiness may call back now.
        writer.write(b"pending")
        await asyncio.sleep(0.05)
        before = calls
        await asyncio.sleep(0.3)
        assert calls == before
        writer.close()


async def test_nothing_is_sent_before_the_handshake(tls: Tls) -> None:
    async with listening(tls) as listener:
        reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
        recorder, stream = await asyncio.wait_for(listener.accepted.get(), 5)
        stream.write(b"too early")
        stream.close()
        assert await asyncio.wait_for(recorder.lost, 5) is None
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()


async def test_a_failing_protocol_ends_its_connection(tls: Tls) -> None:
    loop = asyncio.get_running_loop()
    reported: list[dict[str, object]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: reported.append(context))
    try:
        async with listening(tls) as listener:
            reader, writer = await connect(listener.port, tls.client)
            recorder, _ = await established(listener)

            def fail(data: bytes) -> None:
                raise ValueError("bad input")

            recorder.on_data = fail
            writer.write(b"anything")
            assert isinstance(await asyncio.wait_for(recorder.lost, 5), ValueError)
            assert await asyncio.wait_for(reader.read(), 5) == b""
            writer.close()
    finally:
        loop.set_exception_handler(previous)
    assert [type(c["exception"]) for c in reported] == [ValueError]


async def test_tls_1_2_peers_are_served_too(tls: Tls) -> None:
    older = client_ssl_context(tls.client_trust)
    older.maximum_version = ssl.TLSVersion.TLSv1_2
    async with listening(tls) as listener:
        reader, writer = await connect(listener.port, older)
        recorder, stream = await established(listener)
        assert stream.ssl_object.version() == "TLSv1.2"
        writer.write(b"ping")
        await eventually(lambda: recorder.received == b"ping")
        stream.write(b"pong")
        assert await asyncio.wait_for(reader.readexactly(4), 5) == b"pong"
        writer.close()
        assert await asyncio.wait_for(recorder.lost, 5) is None
