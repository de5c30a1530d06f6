"""Group commit: many small writes, each awaited by its own caller, committed together.

A device's report or sign of life is a tiny write whose cost is mostly fixed: a transaction,
row locks, a commit, each a round trip to the database (to aiosqlite's thread on SQLite). A
fleet writing at once pays that per write. A `GroupCommitter` queues the writes of one kind
and commits one group at a time, made of whatever queued up while the previous group was
committing: a lone write is committed at once, and under load the fixed cost is shared by up
to `max_group` writes. Every caller still waits for its own write's commit, and gets its own
outcome: the commit function answers each item with a result or the exception that refused
it. If the group's transaction fails as a whole, each item is committed again on its own, so
one item that trips the database cannot take the others with it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")

# Commits a group in one transaction; for each item, in order, its result or the exception
# that refused it. Raises if the transaction fails (nothing of the group is stored then).
CommitGroup = Callable[[Sequence[Item]], Awaitable[list[Result | Exception]]]


class GroupCommitter(Generic[Item, Result]):
    """Queues items of one kind and commits them in groups (see the module docstring), in
    the order they were queued."""

    def __init__(
        self, commit_group: CommitGroup[Item, Result], *, max_group: int, name: str
    ) -> None:
        if max_group < 1:
            raise ValueError(f"max_group must be at least 1, not {max_group}")
        self.max_group = max_group
        self.name = name
        self._commit_group = commit_group
        self._queue: list[tuple[Item, asyncio.Future[Result]]] = []
        self._committing: list[tuple[Item, asyncio.Future[Result]]] = []
        self._worker: asyncio.Task[None] | None = None

    async def commit(self, item: Item) -> Result:
        """Commit `item` (with others queued alongside); raises what refused it."""
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._drain(), name=self.name)
            self._worker.add_done_callback(self._abandon)
        # A caller that goes away (its device disconnected) leaves the item queued: it is
        # committed all the same, as a write that had reached the server should be.
        return await asyncio.shield(future)

    async def close(self) -> None:
        """Wait until every queued item has been committed."""
        if self._worker is not None:
            await self._worker

    async def _drain(self) -> None:
        while self._queue:
            self._committing = self._queue[: self.max_group]
            del self._queue[: self.max_group]
            outcomes = await self._commit([item for item, _ in self._committing])
            for (_, future), outcome in zip(self._committing, outcomes, strict=True):
                if isinstance(outcome, Exception):
                    future.set_exception(outcome)
                else:
                    future.set_result(outcome)
            self._committing = []

    def _abandon(self, worker: asyncio.Task[None]) -> None:
        """If the worker ended early (cancelled as the server stops, perhaps before it even
        ran; or a bug), nobody may be left waiting for ever."""
        error = None if worker.cancelled() else worker.exception()
        if error is None and not worker.cancelled():
            return
        for _, future in [*self._committing, *self._queue]:
            if future.done():
                continue
            if error is None:
                future.cancel()
            else:
                future.set_exception(error)
        self._committing = []
        self._queue.clear()

    async def _commit(self, items: list[Item]) -> list[Result | Exception]:
        try:
            return await self._commit_group(items)
        except Exception as error:
            if len(items) == 1:
                return [error]
        # The group's transaction failed: find the item that trips it by committing each
        # on its own.
        outcomes: list[Result | Exception] = []
        for item in items:
            try:
                outcomes.extend(await self._commit_group([item]))
            except Exception as error:
                outcomes.append(error)
        return outcomes
