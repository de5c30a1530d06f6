"""CoAP observations (RFC 7641) served straight into aiocoap's pipe of the registering request,
with nothing running while nothing changes.

aiocoap's `ObservableResource` keeps, for every observation, a task suspended in five
coroutines (`run_driving_pipe` down to `_render_to_pipe` awaiting a future for ever), a
`ServerObservation` with its future, and the responses it sent. A `PipeObservation` is one
small object holding the pipe aiocoap's token manager keeps for the request anyway. The
resource's `render_to_pipe` creates it, `serve()` sends the first answer and returns (ending
aiocoap's rendering task), and `trigger()` renders a notification into the pipe whenever the
observed state may have changed; only while a render is in flight does a task exist. That
saves ~2.6 KiB per observer (bench/connections.py, 1,000 devices: 41.8 -> 39.2 KiB per
connected, observing device); what remains of an idle observation in Python, ~6 KiB, is the
request's own handling in aiocoap (its two pipes and their callbacks, the request and the
path-stripped copy the site renders, the finished rendering task).

Notifications carry increasing Observe numbers (the first answer 0, modulo 2**24 as RFC 7641
compares them). Triggers that arrive while a render is in flight are coalesced into one more
render once it is done, so a device gets the latest state, never a backlog of intermediate
ones. An unsuccessful (non-2.xx) render ends the observation with that answer, as RFC 7641
wants; a 2.03 Valid (the request's ETag matches) is successful and keeps it.

Notifications are not split block-wise (nor were aiocoap's): over `coaps+tcp` each is one
message, whatever its size.

This relies on what aiocoap 0.4.17 (pinned) does with a server-side pipe:

* the token manager keeps the pipe in `incoming_requests` for as long as someone is
  interested in it, and the end of the coroutine that `Context.render_to_pipe` runs adds no
  event to it (`pipe.run_driving_pipe`), so the pipe outlives the rendering task;
* the client's loss of interest ends the pipe, and with it runs every `on_interest_end`
  callback once: a new request on the same token (a GET with Observe: 1 deregisters, one
  with Observe: 0 re-registers; `TokenManager.process_request`), a lost connection
  (`TokenManager.dispatch_error`), and on UDP an RST answering a notification (the message
  manager calls the same stop function);
* a response added with is_last=True ends the pipe from our side, with the same callbacks.

tests/twin/test_pipe_observations.py checks these over `coap+tcp`.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from typing import Protocol

import aiocoap
import aiocoap.error
from aiocoap.numbers.codes import Code
from aiocoap.pipe import Pipe

log = logging.getLogger(__name__)

# RFC 7641 section 3.4: Observe numbers are 24 bits and compared with wrap-around.
OBSERVE_MODULUS = 1 << 24


class Renderer(Protocol):
    """What renders an observed resource's answers to a request, such as the resource's own
    `render`: the first answer and every notification render the registering request."""

    async def render(self, request: aiocoap.Message) -> aiocoap.Message:
        """The resource's current answer to `request`."""
        ...


class PipeObservation:
    """One observation of a resource by one client, held as the pipe of its request.

    Create it in the resource's `render_to_pipe` for a GET with Observe: 0, register it
    wherever changes are learnt, then await `serve()` (which sends the first answer) and
    return. `trigger()` on every change. Subclasses learn the end of the observation
    (whichever side ended it) through `ended()`.
    """

    __slots__ = ("_again", "_context", "_number", "_pipe", "_renderer", "_rendering")

    def __init__(self, pipe: Pipe, renderer: Renderer) -> None:
        # None once the observation has ended.
        self._pipe: Pipe | None = pipe
        self._renderer = renderer
        self._number = 0
        # The render in flight (the first one runs in aiocoap's rendering task); the reference
        # keeps a trigger's task from being collected before it is done.
        self._rendering: asyncio.Task[object] | None = None
        # Whether a trigger came while rendering: the render may already have read old state.
        self._again = False
        # Where renders run: the context the request is served in (create the observation
        # there), not that of whoever triggers, which may be inside a database transaction
        # that a render outliving it must not use.
        self._context = contextvars.copy_context()

    @property
    def active(self) -> bool:
        """Whether the observation has not ended yet."""
        return self._pipe is not None

    async def serve(self) -> None:
        """Send the first answer (and, if triggered meanwhile, a notification after it); from
        then on the observation lives in the pipe until one side ends it. Await it in
        `render_to_pipe`, and return when it does."""
        pipe = self._pipe
        if pipe is None:
            return
        pipe.on_interest_end(self._interest_ended)
        self._rendering = asyncio.current_task()
        await self._send_renders()

    def trigger(self) -> None:
        """The observed state may have changed: render and send a notification (once more
        after the render in flight, if there is one)."""
        if self._pipe is None:
            return
        if self._rendering is not None:
            self._again = True
            return
        # A copy each time: two tasks must never run in one Context object.
        self._rendering = asyncio.get_running_loop().create_task(
            self._send_renders(), context=self._context.copy()
        )

    def ended(self) -> None:
        """Called once when the observation ends, by the client (deregistration, a lost
        connection) or by an unsuccessful notification; for subclasses to unregister it."""

    async def _send_renders(self) -> None:
        try:
            while self._pipe is not None:
                self._again = False
                request = self._pipe.request
                response = await self._render(request)
                pipe = self._pipe
                if pipe is None:
                    return  # the client went away during the render
                last = not response.code.is_successful()
                if not last:
                    response.opt.observe = self._number
                    self._number = (self._number + 1) % OBSERVE_MODULUS
                # The last response ends the pipe, which calls _interest_ended.
                pipe.add_response(response, is_last=last)
                if not self._again:
                    return
        finally:
            self._rendering = None

    async def _render(self, request: aiocoap.Message) -> aiocoap.Message:
        # As aiocoap answers a failed render (pipe.error_to_message): such an answer is
        # unsuccessful, so it ends the observation.
        try:
            return await self._renderer.render(request)
        except aiocoap.error.RenderableError as error:
            message: aiocoap.Message = error.to_message()
            return message
        except Exception:
            log.exception("rendering a notification for %s failed", request.opt.uri_path)
            return aiocoap.Message(code=Code.INTERNAL_SERVER_ERROR)

    def _interest_ended(self) -> None:
        self._pipe = None
        self.ended()
