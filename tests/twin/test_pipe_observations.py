"""Observations served from aiocoap's pipe (`twin.pipe_observations`) on an in-process
aiocoap `coap+tcp` server, with raw RFC 8323 framing on the client side where the exact
messages matter: the first answer and notifications, Observe numbers, coalesced triggers,
unsuccessful renders, and every way the client ends an observation. These also pin down what
the module relies on in aiocoap 0.4.17 (see its docstring). Last, `DeviceObservers` keeping
such observations by device and forgetting ended ones."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import aiocoap
import aiocoap.resource
import pytest
from aiocoap.numbers.codes import Code
from aiocoap.pipe import Pipe

from tests.coap_devices import read_tcp_frame
from tests.conftest import free_port
from twin.device_observers import DeviceObservers, Document
from twin.pipe_observations import OBSERVE_MODULUS, PipeObservation

CSM = 0xE1

# Set around triggers by tests, read by renders.
caller: contextvars.ContextVar[str] = contextvars.ContextVar("caller", default="nobody")


class Tracked(PipeObservation):
    """An observation that records its end."""

    __slots__ = ("ends",)

    def __init__(self, pipe: Pipe, renderer: Counter) -> None:
        super().__init__(pipe, renderer)
        self.ends = 0

    def ended(self) -> None:
        self.ends += 1


class Counter(aiocoap.resource.Resource):  # type: ignore[misc]
    """`/counter`: its value as text; negative values answer 4.04, `fail` raises."""

    def __init__(self) -> None:
        super().__init__()
        self.value = 0
        self.fail = False
        self.renders = 0
        self.callers: list[str] = []
        # While set and not released, renders wait for it.
        self.gate: asyncio.Event | None = None
        self.observations: list[Tracked] = []

    async def render_to_pipe(self, pipe: Pipe) -> None:
        if pipe.request.opt.observe != 0:
            await super().render_to_pipe(pipe)
            return
        observation = Tracked(pipe, self)
        self.observations.append(observation)
        await observation.serve()

    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        self.renders += 1
        self.callers.append(caller.get())
        if self.gate is not None:
            await self.gate.wait()
        if self.fail:
            raise RuntimeError("the render failed")
        if self.value < 0:
            return aiocoap.Message(code=Code.NOT_FOUND)
        return aiocoap.Message(code=Code.CONTENT, payload=str(self.value).encode())

    def trigger(self) -> None:
        for observation in self.observations:
            observation.trigger()


class DeviceCounter(Counter):
    """`/counter` observed through `DeviceObservers`, as device "lamp-1"'s desired state."""

    def __init__(self, registry: DeviceObservers) -> None:
        super().__init__()
        self.registry = registry

    async def render_to_pipe(self, pipe: Pipe) -> None:
        if pipe.request.opt.observe != 0:
            await super().render_to_pipe(pipe)
            return
        await self.registry.observe(pipe, self, "lamp-1", Document.DESIRED)


@dataclass
class Served:
    counter: Counter
    port: int


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    site = aiocoap.resource.Site()
    counter = Counter()
    site.add_resource(["counter"], counter)
    port = free_port()
    context = await aiocoap.Context.create_server_context(
        site, bind=("127.0.0.1", port), transports=["tcpserver"]
    )
    try:
        yield Served(counter, port)
    finally:
        await context.shutdown()


@dataclass(frozen=True)
class Answer:
    code: int
    token: bytes
    observe: int | None
    payload: bytes


class Raw:
    """A `coap+tcp` client speaking RFC 8323 framing by hand."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    def send(self, code: int, token: bytes = b"", *, observe: int | None = None) -> None:
        options = b""
        if code != CSM:
            options = aiocoap.Message(
                code=code, uri_path=("counter",), observe=observe
            ).opt.encode()
        assert len(options) < 13
        self.writer.write(bytes([len(options) << 4 | len(token), code]) + token + options)

    async def answer(self, within: float = 3.0) -> Answer:
        """The next message that is not signalling."""
        while True:
            code, token, rest = await asyncio.wait_for(read_tcp_frame(self.reader), within)
            if code >= CSM:
                continue
            message = aiocoap.Message()
            payload = message.opt.decode(rest)
            return Answer(code, token, message.opt.observe, payload)

    async def nothing_more(self, within: float = 0.3) -> None:
        with pytest.raises(TimeoutError):
            await self.answer(within)


@contextlib.asynccontextmanager
async def raw_client(port: int) -> AsyncIterator[Raw]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    raw = Raw(reader, writer)
    raw.send(CSM)
    try:
        yield raw
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def eventually(check: Callable[[], bool], within: float = 3.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def observed(raw: Raw, served: Served, token: bytes = b"t1") -> Tracked:
    """Register an observation and check its first answer."""
    raw.send(Code.GET, token, observe=0)
    first = await raw.answer()
    assert (first.code, first.token, first.observe) == (Code.CONTENT, token, 0)
    assert first.payload == str(served.counter.value).encode()
    return served.counter.observations[-1]


async def test_notifications_follow_the_first_answer_with_no_task_in_between(
    served: Served,
) -> None:
    async with raw_client(served.port) as raw:
        tasks_before = len(asyncio.all_tasks())
        observation = await observed(raw, served)
        observation_b = await observed(raw, served, b"t2")
        # Nothing runs for an idle observation: aiocoap's rendering tasks have ended.
        await eventually(lambda: len(asyncio.all_tasks()) == tasks_before)
        for value in (5, 6):
            served.counter.value = value
            observation.trigger()
            notified = await raw.answer()
            assert (notified.code, notified.token) == (Code.CONTENT, b"t1")
            assert (notified.observe, notified.payload) == (value - 4, str(value).encode())
        await raw.nothing_more()
        assert observation.active and observation_b.active
        assert observation.ends == 0


async def test_triggers_during_a_render_are_coalesced(served: Served) -> None:
    counter = served.counter
    async with raw_client(served.port) as raw:
        observation = await observed(raw, served)
        counter.gate = asyncio.Event()
        counter.value = 1
        observation.trigger()
        await eventually(lambda: counter.renders == 2)
        counter.value = 2
        observation.trigger()
        counter.value = 3
        observation.trigger()
        counter.gate.set()
        # The render in flight, then one more for the triggers that came during it.
        assert (await raw.answer()).observe == 1
        latest = await raw.answer()
        assert (latest.observe, latest.payload) == (2, b"3")
        await raw.nothing_more()
        assert counter.renders == 3


async def test_a_trigger_during_the_first_render_is_not_lost(served: Served) -> None:
    counter = served.counter
    counter.gate = asyncio.Event()
    async with raw_client(served.port) as raw:
        raw.send(Code.GET, b"t1", observe=0)
        await eventually(lambda: counter.renders == 1)
        counter.value = 7
        counter.trigger()
        counter.gate.set()
        first = await raw.answer()
        assert first.observe == 0
        again = await raw.answer()
        assert (again.observe, again.payload) == (1, b"7")


async def test_renders_run_in_the_request_context_not_the_triggers(served: Served) -> None:
    async with raw_client(served.port) as raw:
        observation = await observed(raw, served)
        # As the reconciler triggers inside a database transaction, which a render that
        # outlives it must not use.
        token = caller.set("a transaction")
        try:
            observation.trigger()
        finally:
            caller.reset(token)
        await raw.answer()
        assert served.counter.callers == ["nobody", "nobody"]


async def test_an_unsuccessful_render_ends_the_observation(served: Served) -> None:
    async with raw_client(served.port) as raw:
        observation = await observed(raw, served)
        served.counter.value = -1
        observation.trigger()
        final = await raw.answer()
        assert (final.code, final.observe) == (Code.NOT_FOUND, None)
        assert not observation.active and observation.ends == 1
        served.counter.value = 1
        observation.trigger()
        await raw.nothing_more()
        assert observation.ends == 1


async def test_a_failing_render_ends_the_observation_with_5_00(served: Served) -> None:
    async with raw_client(served.port) as raw:
        observation = await observed(raw, served)
        served.counter.fail = True
        observation.trigger()
        final = await raw.answer()
        assert (final.code, final.observe) == (Code.INTERNAL_SERVER_ERROR, None)
        assert observation.ends == 1


async def test_an_unsuccessful_first_answer_registers_nothing(served: Served) -> None:
    served.counter.value = -1
    async with raw_client(served.port) as raw:
        raw.send(Code.GET, b"t1", observe=0)
        first = await raw.answer()
        assert (first.code, first.observe) == (Code.NOT_FOUND, None)
        (observation,) = served.counter.observations
        assert not observation.active and observation.ends == 1


async def test_deregistering_with_observe_1_ends_it(served: Served) -> None:
    async with raw_client(served.port) as raw:
        observation = await observed(raw, served)
        raw.send(Code.GET, b"t1", observe=1)
        plain = await raw.answer()
        assert (plain.code, plain.token, plain.observe) == (Code.CONTENT, b"t1", None)
        assert not observation.active and observation.ends == 1
        observation.trigger()
        await raw.nothing_more()


async def test_re_registering_on_the_same_token_replaces_it(served: Served) -> None:
    async with raw_client(served.port) as raw:
        old = await observed(raw, served)
        new = await observed(raw, served)
        assert not old.active and old.ends == 1 and new.active
        served.counter.value = 4
        served.counter.trigger()
        notified = await raw.answer()
        assert (notified.observe, notified.payload) == (1, b"4")
        await raw.nothing_more()


async def test_losing_the_connection_ends_it(served: Served) -> None:
    async with raw_client(served.port) as raw:
        observation = await observed(raw, served)
    await eventually(lambda: not observation.active)
    assert observation.ends == 1


async def test_a_client_gone_during_a_render_gets_nothing_and_nothing_fails(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    counter = served.counter
    async with raw_client(served.port) as raw:
        observation = await observed(raw, served)
        counter.gate = asyncio.Event()
        observation.trigger()
        await eventually(lambda: counter.renders == 2)
    await eventually(lambda: not observation.active)
    counter.gate.set()
    await asyncio.sleep(0.1)  # the render finishes
    assert observation.ends == 1
    # aiocoap warns of a response added to a pipe that has ended.
    assert not [r for r in caplog.records if r.levelname in ("WARNING", "ERROR")]


async def test_observe_numbers_wrap_around_at_24_bits(served: Served) -> None:
    async with raw_client(served.port) as raw:
        observation = await observed(raw, served)
        observation._number = OBSERVE_MODULUS - 1
        observation.trigger()
        assert (await raw.answer()).observe == OBSERVE_MODULUS - 1
        observation.trigger()
        assert (await raw.answer()).observe == 0


async def test_an_aiocoap_client_follows_the_notifications(served: Served) -> None:
    client = await aiocoap.Context.create_client_context(transports=["tcpclient"])
    try:
        request = client.request(
            aiocoap.Message(
                code=aiocoap.GET, uri=f"coap+tcp://127.0.0.1:{served.port}/counter", observe=0
            )
        )
        first = await asyncio.wait_for(request.response, 3)
        assert first.payload == b"0"
        updates = aiter(request.observation)
        for value in (1, 2, 3):
            served.counter.value = value
            served.counter.trigger()
            notified = await asyncio.wait_for(anext(updates), 3)
            assert notified.payload == str(value).encode()
        request.observation.cancel()
    finally:
        await client.shutdown()


@pytest.fixture
async def registry() -> AsyncIterator[tuple[DeviceObservers, int]]:
    observers = DeviceObservers()
    site = aiocoap.resource.Site()
    site.add_resource(["counter"], DeviceCounter(observers))
    port = free_port()
    context = await aiocoap.Context.create_server_context(
        site, bind=("127.0.0.1", port), transports=["tcpserver"]
    )
    try:
        yield observers, port
    finally:
        await context.shutdown()


async def test_device_observers_notify_by_document_and_forget_ended_ones(
    registry: tuple[DeviceObservers, int],
) -> None:
    observers, port = registry
    async with raw_client(port) as first, raw_client(port) as second:
        for raw in (first, second):
            raw.send(Code.GET, b"t1", observe=0)
            assert (await raw.answer()).observe == 0
        assert len(observers) == 2
        assert observers.notify("lamp-1", frozenset({Document.DELTA})) == 0
        assert observers.notify("lamp-2") == 0
        assert observers.notify("lamp-1", frozenset({Document.DESIRED})) == 2
        assert (await first.answer()).observe == 1
        assert (await second.answer()).observe == 1
        first.send(Code.GET, b"t1", observe=1)
        await first.answer()
        assert len(observers) == 1
    await eventually(lambda: len(observers) == 0)
    assert observers.notify("lamp-1") == 0
