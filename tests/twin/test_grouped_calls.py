"""Grouped calls (twin/grouped_calls.py): how calls are grouped, answered and isolated, with a
stand-in for the database."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from twin.errors import InvalidArgument, ResourceExhausted
from twin.grouped_calls import GroupedCalls


class FakeDatabase:
    """Commits numbers: records each group, can hold a commit until released, refuses
    negative numbers, and fails any transaction that holds 13."""

    def __init__(self) -> None:
        self.groups: list[list[int]] = []
        self.committed: list[int] = []
        self.release = asyncio.Event()
        self.release.set()

    async def commit(self, numbers: Sequence[int]) -> list[int | Exception]:
        await self.release.wait()
        self.groups.append(list(numbers))
        if 13 in numbers:
            raise RuntimeError("the transaction failed")
        outcomes: list[int | Exception] = []
        for n in numbers:
            if n < 0:
                outcomes.append(InvalidArgument(f"{n} is negative"))
            else:
                self.committed.append(n)
                outcomes.append(n * 10)
        return outcomes


def committer(database: FakeDatabase, max_group: int = 100) -> GroupedCalls[int, int]:
    return GroupedCalls(database.commit, max_group=max_group, name="test commits")


async def test_writes_arriving_during_a_commit_share_the_next_one() -> None:
    database = FakeDatabase()
    writes = committer(database)
    database.release.clear()
    first = asyncio.create_task(writes.call(1))
    await asyncio.sleep(0)
    await asyncio.sleep(0)  # the first group (just 1) is now committing
    rest = [asyncio.create_task(writes.call(n)) for n in range(2, 8)]
    await asyncio.sleep(0)
    database.release.set()
    results = await asyncio.gather(first, *rest)
    assert database.groups == [[1], [2, 3, 4, 5, 6, 7]]
    assert results == [10, 20, 30, 40, 50, 60, 70]  # each caller its own answer
    await writes.close()


async def test_groups_are_bounded_and_keep_the_order() -> None:
    database = FakeDatabase()
    writes = committer(database, max_group=3)
    database.release.clear()
    tasks = [asyncio.create_task(writes.call(n)) for n in range(1, 9)]
    await asyncio.sleep(0)
    database.release.set()
    await asyncio.gather(*tasks)
    assert database.groups == [[1, 2, 3], [4, 5, 6], [7, 8]]
    with pytest.raises(ValueError, match="max_group"):
        committer(database, max_group=0)


async def test_a_refused_write_fails_alone() -> None:
    database = FakeDatabase()
    writes = committer(database)
    outcomes = await asyncio.gather(*(writes.call(n) for n in (1, -2, 3)), return_exceptions=True)
    assert outcomes[0] == 10 and outcomes[2] == 30
    assert isinstance(outcomes[1], InvalidArgument)
    assert database.committed == [1, 3]


async def test_a_failed_transaction_is_retried_write_by_write() -> None:
    database = FakeDatabase()
    writes = committer(database)
    outcomes = await asyncio.gather(
        *(writes.call(n) for n in (1, 2, 13, 4)), return_exceptions=True
    )
    assert isinstance(outcomes[2], RuntimeError)
    assert [outcomes[i] for i in (0, 1, 3)] == [10, 20, 40]
    assert database.committed == [1, 2, 4]
    assert database.groups == [[1, 2, 13, 4], [1], [2], [13], [4]]


async def test_a_caller_that_goes_away_leaves_its_write_committed() -> None:
    database = FakeDatabase()
    writes = committer(database)
    database.release.clear()
    caller = asyncio.create_task(writes.call(1))
    await asyncio.sleep(0)
    caller.cancel()
    database.release.set()
    await writes.close()
    assert database.committed == [1]


@pytest.mark.parametrize("started", [False, True])
async def test_stopping_the_committer_answers_everyone(started: bool) -> None:
    """Cancelled as the server stops, before its worker even ran or during a commit."""
    database = FakeDatabase()
    writes = committer(database)
    database.release.clear()
    waiting = [asyncio.create_task(writes.call(n)) for n in (1, 2)]
    await asyncio.sleep(0)
    if started:
        await asyncio.sleep(0)
    assert writes._worker is not None
    writes._worker.cancel()
    outcomes = await asyncio.gather(*waiting, return_exceptions=True)
    assert all(isinstance(o, asyncio.CancelledError) for o in outcomes)
    assert database.groups == []
    # A later write starts afresh.
    database.release.set()
    assert await writes.call(3) == 30


async def test_calls_beyond_the_queue_bound_are_refused() -> None:
    release = asyncio.Event()

    async def slow(items: object) -> list[int | Exception]:
        await release.wait()
        return [0 for _ in items]  # type: ignore[attr-defined]

    calls: GroupedCalls[int, int] = GroupedCalls(slow, max_group=1, name="writes", max_queued=2)
    running = [asyncio.create_task(calls.call(0))]
    await asyncio.sleep(0)
    await asyncio.sleep(0)  # 0 is being called for
    running += [asyncio.create_task(calls.call(n)) for n in (1, 2)]
    await asyncio.sleep(0)  # 1 and 2 wait
    with pytest.raises(ResourceExhausted, match="2 writes are waiting") as refused:
        await calls.call(3)
    assert refused.value.retry_after_seconds == 1
    release.set()
    assert await asyncio.gather(*running) == [0, 0, 0]


def test_an_instance_outlives_its_event_loop() -> None:
    """Module-level instances (certificate lookups) serve whichever loop calls them; what
    was left queued on a loop that is gone is dropped, not waited for."""
    database = FakeDatabase()
    calls = committer(database)
    database.release.clear()
    first_loop = asyncio.new_event_loop()

    async def leave_one_pending() -> asyncio.Task[int]:
        pending = asyncio.ensure_future(calls.call(1))
        await asyncio.sleep(0)
        await asyncio.sleep(0)  # the worker now waits in the group call, for ever
        return pending

    pending = first_loop.run_until_complete(leave_one_pending())
    assert not pending.done()
    # Its tasks are abandoned on purpose: no "Task was destroyed but it is pending!" noise.
    first_loop.set_exception_handler(lambda loop, context: None)
    first_loop.close()

    async def call_again() -> int:
        database.release = asyncio.Event()
        database.release.set()
        return await asyncio.wait_for(calls.call(2), 5)

    assert asyncio.run(call_again()) == 20
