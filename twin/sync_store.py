"""Keeping each twin's sync status current (the rules are in reconciliation.py).

The status is recomputed inside the transaction of every event that can change it: a desired
update, a report (with or without an acknowledgement), the device going online or offline,
and a re-notification by the reconciler. A change of state is a SYNC_STATUS_CHANGED entry in
the change feed, so watchers see "every lamp in district north not in sync" change live.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from twin.change_feed import ChangeType, NewEntry
from twin.delta import compute_delta
from twin.models import Twin
from twin.reconciliation import (
    Acknowledgement,
    SyncState,
    SyncStatus,
    next_push_due,
    next_sync_status,
    record_push,
    status_from_json,
    status_to_json,
)
from twin.selectors import Subject


def sync_state_of(stored: dict[str, Any] | None) -> str:
    """The state of a stored status; a twin whose desired state was never set is in sync."""
    if not stored:
        return SyncState.IN_SYNC.value
    return str(stored["state"])


def ack_to_json(ack: Acknowledgement) -> dict[str, Any]:
    """An acknowledgement as stored (the form the device sent)."""
    return {
        "version": ack.version,
        "status": ack.status.value,
        "reason": ack.reason,
        "properties": {
            path: {"status": p.status.value, "reason": p.reason}
            for path, p in ack.properties.items()
        },
    }


def updated_sync(
    row: Twin, subject: Subject, *, online: bool, ack: Acknowledgement | None, now: datetime
) -> tuple[bool, NewEntry | None]:
    """Recompute `row`'s status in memory (the caller saves `sync` and `next_push_at`).
    Returns whether the row changed, and the feed entry to append if the state changed."""
    previous = status_from_json(row.sync) if row.sync else None
    delta = compute_delta(row.desired, row.reported)
    if previous is None and not delta and ack is None:
        return False, None  # desired never set: nothing to reconcile
    status = next_sync_status(
        previous,
        delta=delta,
        desired_version=row.desired_version,
        online=online,
        ack=ack,
        now=now,
    )
    if status.state is SyncState.PENDING and status.push_attempts == 0:
        # The change that made it pending reaches observers through the feed right now:
        # that is the first notification; the reconciler only re-notifies after it.
        status = record_push(status, now)
    return _store(row, subject, previous, status)


def record_renotification(row: Twin, subject: Subject, now: datetime) -> bool:
    """Count one more notification of a PENDING twin (in memory; the caller saves)."""
    previous = status_from_json(row.sync) if row.sync else None
    if previous is None or previous.state is not SyncState.PENDING:
        row.next_push_at = None
        return True
    changed, _ = _store(row, subject, previous, record_push(previous, now))
    return changed


def _store(
    row: Twin, subject: Subject, previous: SyncStatus | None, status: SyncStatus
) -> tuple[bool, NewEntry | None]:
    stored = status_to_json(status)
    if stored == row.sync:
        return False, None
    row.sync = stored
    row.next_push_at = next_push_due(status)
    if previous is not None and previous.state is status.state:
        return True, None
    return True, NewEntry(subject, ChangeType.SYNC_STATUS_CHANGED, row.version, patch=stored)
