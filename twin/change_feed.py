"""The durable, ordered change feed and the wake-ups that let watchers follow it.

Every device and twin change appends one entry in the same transaction as the change itself.
The entry id is the cursor. Readers must never see id N+1 before id N becomes visible, or a
watcher that resumed after N+1 would skip N for ever; PostgreSQL assigns sequence values at
insert time but commits in any order, so on PostgreSQL each appending transaction takes one
transaction-level advisory lock just before its insert and holds it to commit, which makes
feed commits happen in id order. (SQLite has a single writer, so the order holds already.)

Watchers sleep until `FeedNotifier` wakes them: writers in this process wake it directly
after commit; writes of other replicas arrive by PostgreSQL NOTIFY on a LISTEN connection;
and a slow poll covers a lost notification or a dropped LISTEN connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, Protocol, TypeVar

import asyncpg
from tortoise import connections
from tortoise.backends.base.client import BaseDBAsyncClient

from twin.database import is_postgres
from twin.errors import InvalidArgument, OutOfRange
from twin.merge_patch import Document
from twin.models import ChangeEntry, FeedState
from twin.selectors import Selector, Subject, matches

log = logging.getLogger(__name__)

NOTIFY_CHANNEL = "citytwin_feed"
_APPEND_LOCK_KEY = 0x66656564  # "feed"
_READ_BATCH = 500


class ChangeType(StrEnum):
    """What a feed entry records (mirrors citytwin.v1.ChangeType)."""

    DEVICE_CREATED = "DEVICE_CREATED"
    DEVICE_UPDATED = "DEVICE_UPDATED"
    DEVICE_DECOMMISSIONED = "DEVICE_DECOMMISSIONED"
    DESIRED_UPDATED = "DESIRED_UPDATED"
    REPORTED_UPDATED = "REPORTED_UPDATED"
    DEVICE_ONLINE = "DEVICE_ONLINE"
    DEVICE_OFFLINE = "DEVICE_OFFLINE"
    SYNC_STATUS_CHANGED = "SYNC_STATUS_CHANGED"
    ALARM_RAISED = "ALARM_RAISED"
    ALARM_ACKNOWLEDGED = "ALARM_ACKNOWLEDGED"
    ALARM_CLEARED = "ALARM_CLEARED"


@dataclass(frozen=True)
class NewEntry:
    """An entry to append."""

    subject: Subject
    change_type: ChangeType
    twin_version: int = 0
    patch: Document | None = None
    device: dict[str, Any] | None = None


def subject_to_json(subject: Subject) -> dict[str, Any]:
    """The stored form of a device's selector-visible attributes."""
    return {
        "id": subject.id,
        "kind": subject.kind,
        "model": subject.model,
        "state": subject.state,
        "serial": subject.serial,
        "site": subject.site,
        "labels": dict(subject.labels),
        "online": subject.online,
    }


def subject_from_json(data: dict[str, Any]) -> Subject:
    """Inverse of subject_to_json."""
    return Subject(
        id=data["id"],
        kind=data["kind"],
        model=data["model"],
        state=data["state"],
        serial=data["serial"],
        site=data["site"],
        labels=data["labels"],
        online=bool(data.get("online", False)),
    )


async def append(conn: BaseDBAsyncClient, entries: Sequence[NewEntry]) -> None:
    """Append entries inside the caller's transaction `conn`; call last before commit."""
    if not entries:
        return
    now = datetime.now(UTC)
    if conn.capabilities.dialect == "postgres":
        # One round trip: the ordering lock, and the wake-up PostgreSQL sends to every
        # listening replica when (and only if) this transaction commits.
        await conn.execute_query(
            f"SELECT pg_advisory_xact_lock($1), pg_notify('{NOTIFY_CHANNEL}', '')",
            [_APPEND_LOCK_KEY],
        )
    await ChangeEntry.bulk_create(
        [
            ChangeEntry(
                device_id=e.subject.id,
                change_type=e.change_type.value,
                subject=subject_to_json(e.subject),
                twin_version=e.twin_version,
                patch=e.patch,
                device=e.device,
                created_at=now,
            )
            for e in entries
        ],
        using_db=conn,
    )


def parse_cursor(text: str) -> int:
    """A cursor string as the entry id it stands for."""
    if not text.isdigit() or len(text) > 19:
        raise InvalidArgument(f"cursor {text!r} is malformed (expected a cursor of an event)")
    return int(text)


async def latest_cursor() -> int:
    """The id of the newest entry, 0 if the feed is empty."""
    newest = await ChangeEntry.all().order_by("-id").first().values_list("id", flat=True)
    return int(str(newest)) if newest is not None else 0


async def trimmed_through() -> int:
    """Entries up to this id may have been deleted by retention."""
    state = await FeedState.get_or_none(id=1)
    return state.trimmed_through if state else 0


async def trim(retention: timedelta) -> int:
    """Delete entries older than `retention`, always keeping the newest one (so that ids are
    never reused on SQLite). Returns how many were deleted."""
    cutoff = datetime.now(UTC) - retention
    newest = await latest_cursor()
    last_old = (
        await ChangeEntry.filter(created_at__lt=cutoff, id__lt=newest)
        .order_by("-id")
        .first()
        .values_list("id", flat=True)
    )
    if last_old is None:
        return 0
    state, _ = await FeedState.get_or_create(id=1, defaults={"trimmed_through": 0})
    if last_old > state.trimmed_through:
        # Record the watermark first: a watcher must learn of a gap before it can fall in it.
        await FeedState.filter(id=1).update(trimmed_through=last_old)
    return await ChangeEntry.filter(id__lte=last_old).delete()


class FeedNotifier:
    """Wakes watchers of this process when the feed may have grown."""

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self._listen_task: asyncio.Task[None] | None = None

    def wake(self) -> None:
        """Wake everyone waiting now; later waiters wait for the next wake."""
        self._event.set()
        self._event = asyncio.Event()

    def waiter(self) -> asyncio.Event:
        """The event the next wake sets; take it before reading to never miss a wake."""
        return self._event

    async def start(self) -> None:
        """On PostgreSQL, start listening for other replicas' appends."""
        if is_postgres():
            self._listen_task = asyncio.create_task(self._listen(), name="feed-listen")

    async def stop(self) -> None:
        """Stop listening."""
        if self._listen_task:
            self._listen_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listen_task

    async def _listen(self) -> None:
        client = connections.get("default")
        params = {
            key: getattr(client, key)
            for key in ("host", "port", "user", "password", "database")
            if getattr(client, key, None) is not None
        }
        while True:
            try:
                conn = await asyncpg.connect(**params)
                try:
                    await conn.add_listener(NOTIFY_CHANNEL, lambda *_: self.wake())
                    self.wake()  # anything appended while we were not listening
                    closed = asyncio.Event()
                    conn.add_termination_listener(lambda *_, ev=closed: ev.set())
                    await closed.wait()
                finally:
                    await conn.close()
            except asyncio.CancelledError:
                raise
            except (OSError, asyncpg.PostgresError) as exc:
                log.warning("feed LISTEN connection lost, retrying", extra={"error": str(exc)})
            await asyncio.sleep(1.0)


async def watch(
    notifier: FeedNotifier,
    selector: Selector,
    after_cursor: str,
    *,
    poll_seconds: float = 5.0,
) -> AsyncIterator[ChangeEntry]:
    """Yield feed entries matching `selector` after `after_cursor`, for ever.

    An empty cursor starts at the current end; OutOfRange if entries after the cursor have
    been trimmed (the caller would otherwise silently miss them).
    """

    async def entries_after(cursor: int) -> list[ChangeEntry]:
        return await ChangeEntry.filter(id__gt=cursor).order_by("id").limit(_READ_BATCH)

    async for entry in _follow(notifier, after_cursor, poll_seconds, entries_after):
        if matches(selector, subject_from_json(entry.subject)):
            yield entry


@dataclass(frozen=True)
class Headline:
    """What kind of change happened to which device: a feed entry without its body."""

    id: int
    device_id: str
    change_type: ChangeType


async def headlines(
    notifier: FeedNotifier, *, poll_seconds: float = 5.0
) -> AsyncIterator[Headline]:
    """Yield the headline of every entry appended from now on, for ever: `watch` for
    followers that need no more (device observers, which re-render what they serve), without
    loading and parsing each entry's subject and patch, which would cost as much as writing it.
    OutOfRange as `watch`."""

    async def headlines_after(cursor: int) -> list[Headline]:
        rows = (
            await ChangeEntry.filter(id__gt=cursor)
            .order_by("id")
            .limit(_READ_BATCH)
            .values_list("id", "device_id", "change_type")
        )
        return [Headline(int(i), str(d), ChangeType(str(c))) for i, d, c in rows]

    async for headline in _follow(notifier, "", poll_seconds, headlines_after):
        yield headline


class _HasId(Protocol):
    @property
    def id(self) -> int: ...


Read = TypeVar("Read", bound=_HasId)


async def _follow(
    notifier: FeedNotifier,
    after_cursor: str,
    poll_seconds: float,
    read_after: Callable[[int], Awaitable[Sequence[Read]]],
) -> AsyncIterator[Read]:
    """What `read_after(cursor)` reads in batches of up to _READ_BATCH, one after the other,
    for ever: reading again when woken (or every `poll_seconds`) once caught up."""
    cursor = await latest_cursor() if after_cursor == "" else parse_cursor(after_cursor)
    while True:
        woken = notifier.waiter()
        if cursor < await trimmed_through():
            raise OutOfRange(
                f"cursor {cursor} is older than the retained change feed; "
                "re-read the twins and watch from the current end"
            )
        batch = await read_after(cursor)
        for item in batch:
            cursor = item.id
            yield item
        if len(batch) < _READ_BATCH:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(woken.wait(), poll_seconds)
