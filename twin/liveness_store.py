"""Device liveness in the database: recording that a device was heard from, and marking
silent devices offline. Both transitions are change-feed events.

`Liveness.seen` is called on every CoAP request a device makes. Writing `last_seen_at` on each
would double the writes of a reporting fleet, so each replica writes it at most every
`WRITE_EVERY_SECONDS` per device; an offline device coming back is always written at once.
The writes of devices heard from at the same time (a district reconnecting) share
transactions (group commit, see grouped_calls.py).
`sweep` runs on every replica: the offline transition is a conditional update, so when two
replicas sweep together only one records it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import UTC, datetime

from tortoise.backends.base.client import BaseDBAsyncClient
from tortoise.transactions import in_transaction

from twin import change_feed
from twin.change_feed import ChangeType, FeedNotifier, NewEntry
from twin.grouped_calls import GroupedCalls
from twin.liveness import check_tolerance, silent_since
from twin.models import Device, Twin
from twin.profile_store import get_profile
from twin.registry import LifecycleState, view_of
from twin.sync_store import updated_sync
from twin.twin_store import lock_twins

# Finer than any heartbeat interval (>= 10 s) times any tolerance (>= 1).
WRITE_EVERY_SECONDS = 5.0
_TRACKED_LIMIT = 200_000


# Signs of life written per transaction at most (group commit, see grouped_calls.py).
_MAX_GROUP = 200


class Liveness:
    """Last-seen bookkeeping for one process."""

    def __init__(self, notifier: FeedNotifier, tolerance: float) -> None:
        check_tolerance(tolerance)
        self.notifier = notifier
        self.tolerance = tolerance
        # device id -> monotonic time this replica last wrote its last_seen_at
        self._written: dict[str, float] = {}
        # A storm of reconnecting devices makes one write each: they share transactions.
        self._writes: GroupedCalls[str, None] = GroupedCalls(
            self._record_seen, max_group=_MAX_GROUP, name="liveness writes"
        )

    async def seen(self, device_id: str) -> None:
        """Record that `device_id` was heard from now (throttled, see the module docstring)."""
        tick = time.monotonic()
        last = self._written.get(device_id)
        if last is not None and tick - last < WRITE_EVERY_SECONDS:
            return
        if len(self._written) >= _TRACKED_LIMIT:
            self._written.clear()
        self._written[device_id] = tick
        await self._writes.call(device_id)

    async def close(self) -> None:
        """Wait until every queued sign of life has been written."""
        await self._writes.close()

    async def _record_seen(self, device_ids: Sequence[str]) -> list[Exception | None]:
        """One transaction: every device of `device_ids` (unless decommissioned or gone)
        seen now; online again, with its feed entry, if it was offline."""
        ids = sorted(set(device_ids))
        async with in_transaction() as conn:
            # Twins before devices, each in id order, as twin updates take them (no deadlock).
            twins = await lock_twins(conn, ids)
            rows = [
                row
                for row in await Device.filter(id__in=ids)
                .using_db(conn)
                .select_for_update()
                .order_by("id")
                if row.state != LifecycleState.DECOMMISSIONED
            ]
            if not rows:
                return [None] * len(device_ids)
            now = datetime.now(UTC)
            await (
                Device.filter(id__in=[row.id for row in rows])
                .using_db(conn)
                .update(last_seen_at=now, online=True)
            )
            entries: list[NewEntry] = []
            for row in rows:
                if not row.online:
                    row.online, row.last_seen_at = True, now
                    twin = twins.get(row.id)
                    entries += await _transition(conn, row, twin, ChangeType.DEVICE_ONLINE, now)
            await change_feed.append(conn, entries)
        if entries:
            self.notifier.wake()
        return [None] * len(device_ids)

    async def sweep(self) -> int:
        """Mark offline every online device silent for longer than its profile's heartbeat
        interval times the tolerance; returns how many this call marked."""
        marked = 0
        now = datetime.now(UTC)
        models = await Device.filter(online=True).distinct().values_list("model", flat=True)
        for model in models:
            profile = await get_profile(str(model))
            since = silent_since(profile.heartbeat_interval_seconds, self.tolerance, now)
            silent = await Device.filter(
                online=True, model=model, last_seen_at__lt=since
            ).values_list("id", flat=True)
            for device_id in silent:
                marked += await self._mark_offline(str(device_id), since)
        if marked:
            self.notifier.wake()
        return marked

    async def _mark_offline(self, device_id: str, since: datetime) -> int:
        async with in_transaction() as conn:
            twin = (await lock_twins(conn, [device_id])).get(device_id)
            changed = await (
                Device.filter(id=device_id, online=True, last_seen_at__lt=since)
                .using_db(conn)
                .update(online=False)
            )
            if not changed:
                return 0  # heard from meanwhile, or another replica got there first
            row = await Device.filter(id=device_id).using_db(conn).get()
            now = datetime.now(UTC)
            await change_feed.append(
                conn, await _transition(conn, row, twin, ChangeType.DEVICE_OFFLINE, now)
            )
        self._written.pop(device_id, None)
        return 1


async def _transition(
    conn: BaseDBAsyncClient, row: Device, twin: Twin | None, change: ChangeType, now: datetime
) -> list[NewEntry]:
    """The feed entries of an online/offline change, for the caller to append: the change
    itself, and the twin's sync status after it (a pending twin becomes stale when its device
    goes offline, and back), which is saved here."""
    view = view_of(row)
    entries = [NewEntry(view.subject, change, device=view.to_json())]
    if twin is not None:
        changed, entry = updated_sync(twin, view.subject, online=row.online, ack=None, now=now)
        if changed:
            await twin.save(using_db=conn, update_fields=["sync", "next_push_at"])
        if entry is not None:
            entries.append(entry)
    return entries
