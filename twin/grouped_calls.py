"""Grouped calls: many small database calls of one kind, each awaited by its own caller,
made together: group commit for writes, one query for many reads.

A device's report or sign of life is a tiny write whose cost is mostly fixed: a transaction,
row locks, a commit, each a round trip to the database (to aiosqlite's thread on SQLite); a
notification pushed to a device is a read of its twin, also mostly fixed cost. A fleet doing
that at once pays it per device. `GroupedCalls` queues the calls of one kind and makes one
group call at a time, with whatever queued up while the previous one ran: a lone call is
made at once, and under load the fixed cost is shared by up to `max_group` calls. Every
caller still waits for its own item, and gets its own outcome: the group function answers
each item with a result or the exception that refused it. If the group call fails as a whole
(a transaction that cannot commit), each item is tried again on its own, so one item that
trips the database cannot take the others with it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

from twin.errors import ResourceExhausted

Item = TypeVar("Item")
Result = TypeVar("Result")

# Makes the call for a group of items (a write: in one transaction); for each item, in order,
# its result or the exception that refused it. Raises if the call fails as a whole (a write:
# nothing of the group is stored then).
GroupCall = Callable[[Sequence[Item]], Awaitable[list[Result | Exception]]]


class GroupedCalls(Generic[Item, Result]):
    """Queues items of one kind and calls for them in groups (see the module docstring), in
    the order they were queued."""

    def __init__(
        self,
        group_call: GroupCall[Item, Result],
        *,
        max_group: int,
        name: str,
        max_queued: int | None = None,
    ) -> None:
        if max_group < 1:
            raise ValueError(f"max_group must be at least 1, not {max_group}")
        self.max_group = max_group
        # Beyond it a call is refused (ResourceExhausted, retry in a second) rather than
        # queued: backpressure when callers outrun the database. None: callers are bounded
        # otherwise (such as one read per observation).
        self.max_queued = max_queued
        self.name = name
        self._group_call = group_call
        self._queue: list[tuple[Item, asyncio.Future[Result]]] = []
        self._running: list[tuple[Item, asyncio.Future[Result]]] = []
        self._worker: asyncio.Task[None] | None = None

    async def call(self, item: Item) -> Result:
        """The result for `item` (called for with others queued alongside); raises what
        refused it."""
        loop = asyncio.get_running_loop()
        if self._worker is not None and self._worker.get_loop() is not loop:
            # A module-level instance outlived its event loop (one loop per test, say):
            # whatever was queued there can never be answered.
            self._worker, self._queue, self._running = None, [], []
        if self.max_queued is not None and len(self._queue) >= self.max_queued:
            raise ResourceExhausted(f"{self.max_queued} {self.name} are waiting; retry in 1 s", 1)
        future: asyncio.Future[Result] = loop.create_future()
        self._queue.append((item, future))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._drain(), name=self.name)
            self._worker.add_done_callback(self._abandon)
        # A caller that goes away (its device disconnected) leaves the item queued: a write
        # is committed all the same, as one that had reached the server should be.
        return await asyncio.shield(future)

    async def close(self) -> None:
        """Wait until every queued item has been called for."""
        if self._worker is not None:
            await self._worker

    async def _drain(self) -> None:
        while self._queue:
            self._running = self._queue[: self.max_group]
            del self._queue[: self.max_group]
            outcomes = await self._call_group([item for item, _ in self._running])
            for (_, future), outcome in zip(self._running, outcomes, strict=True):
                if isinstance(outcome, Exception):
                    future.set_exception(outcome)
                else:
                    future.set_result(outcome)
            self._running = []

    def _abandon(self, worker: asyncio.Task[None]) -> None:
        """If the worker ended early (cancelled as the server stops, perhaps before it even
        ran; or a bug), nobody may be left waiting for ever."""
        error = None if worker.cancelled() else worker.exception()
        if error is None and not worker.cancelled():
            return
        for _, future in [*self._running, *self._queue]:
            if future.done():
                continue
            if error is None:
                future.cancel()
            else:
                future.set_exception(error)
        self._running = []
        self._queue.clear()

    async def _call_group(self, items: list[Item]) -> list[Result | Exception]:
        try:
            return await self._group_call(items)
        except Exception as error:
            if len(items) == 1:
                return [error]
        # The group call failed: find the item that trips it by calling for each on its own.
        outcomes: list[Result | Exception] = []
        for item in items:
            try:
                outcomes.extend(await self._group_call([item]))
            except Exception as error:
                outcomes.append(error)
        return outcomes
