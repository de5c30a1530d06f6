"""Alarms in the database: raised, refreshed and cleared inside the transaction of the report
that changes them (see alarm_rules.py), acknowledged by operators, listed and watched. Each
change is an ALARM_* entry in the change feed, which is what WatchAlarms streams."""

from __future__ import annotations

from collections.abc import AsyncIterator, Collection
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from tortoise.backends.base.client import BaseDBAsyncClient
from tortoise.transactions import in_transaction

from twin import change_feed
from twin.access import Principal
from twin.alarm_rules import fault_changes
from twin.change_feed import ChangeType, FeedNotifier, NewEntry
from twin.errors import InvalidArgument, NotFound
from twin.merge_patch import Document
from twin.models import Alarm, ChangeEntry, Device
from twin.page_tokens import decode_numeric_page_token, encode_page_token, page_size
from twin.profiles import ALARM_SEVERITIES, Profile
from twin.registry import view_of
from twin.selectors import Selector, Subject, matches

ALARM_CHANGES = (ChangeType.ALARM_RAISED, ChangeType.ALARM_ACKNOWLEDGED, ChangeType.ALARM_CLEARED)
MAX_NOTE = 512


@dataclass(frozen=True)
class AlarmView:
    """An alarm as callers see it."""

    id: int
    device_id: str
    property: str
    severity: str
    active: bool
    first_seen_at: datetime
    last_seen_at: datetime
    cleared_at: datetime | None
    acknowledged_at: datetime | None
    acknowledged_by: str
    note: str

    def to_json(self) -> dict[str, Any]:
        """The form stored in change-feed entries."""
        return {
            "id": self.id,
            "device_id": self.device_id,
            "property": self.property,
            "severity": self.severity,
            "active": self.active,
            "first_seen_at": self.first_seen_at.isoformat(),
            "last_seen_at": self.last_seen_at.isoformat(),
            "cleared_at": _iso(self.cleared_at),
            "acknowledged_at": _iso(self.acknowledged_at),
            "acknowledged_by": self.acknowledged_by,
            "note": self.note,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AlarmView:
        """Inverse of to_json."""
        return cls(
            id=data["id"],
            device_id=data["device_id"],
            property=data["property"],
            severity=data["severity"],
            active=data["active"],
            first_seen_at=datetime.fromisoformat(data["first_seen_at"]),
            last_seen_at=datetime.fromisoformat(data["last_seen_at"]),
            cleared_at=_from_iso(data["cleared_at"]),
            acknowledged_at=_from_iso(data["acknowledged_at"]),
            acknowledged_by=data["acknowledged_by"],
            note=data["note"],
        )


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment else None


def _from_iso(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text) if text else None


def _view(row: Alarm) -> AlarmView:
    return AlarmView(
        id=row.id,
        device_id=row.device_id,
        property=row.property,
        severity=row.severity,
        active=row.active,
        first_seen_at=row.first_seen_at,
        last_seen_at=row.last_seen_at,
        cleared_at=row.cleared_at,
        acknowledged_at=row.acknowledged_at,
        acknowledged_by=row.acknowledged_by,
        note=row.note,
    )


def _entry(subject: Subject, change: ChangeType, row: Alarm) -> NewEntry:
    return NewEntry(subject, change, patch=_view(row).to_json())


async def active_alarms(
    conn: BaseDBAsyncClient, device_ids: Collection[str]
) -> dict[str, dict[str, Alarm]]:
    """The active alarms of `device_ids` by device and property, read in one query inside the
    caller's transaction (every device has an entry, empty if it has no active alarm)."""
    found: dict[str, dict[str, Alarm]] = {device_id: {} for device_id in device_ids}
    if found:
        rows = await Alarm.filter(device_id__in=list(found), active=True).using_db(conn)
        for row in rows:
            found[row.device_id][row.property] = row
    return found


async def apply_report(
    conn: BaseDBAsyncClient,
    profile: Profile,
    subject: Subject,
    reported: Document,
    report: Document,
    now: datetime,
    active: dict[str, Alarm],
) -> tuple[bool, list[NewEntry]]:
    """Raise, refresh and clear the device's alarms after a report, inside the report's
    transaction (which holds the twin's row lock, so reports of one device are serialised).
    `active` is the device's active alarms by property (see active_alarms), kept up to date
    here for the next report of the same transaction. Returns whether any alarm changed, and
    the feed entries for the caller to append."""
    entries: list[NewEntry] = []
    if not profile.fault_properties:
        return False, entries
    changes = fault_changes(profile, reported, report, active)
    for path in changes.raised:
        spec = profile.spec(path)
        assert spec is not None
        row = await Alarm.create(
            using_db=conn,
            device_id=subject.id,
            property=path,
            severity=spec.alarm_severity,
            first_seen_at=now,
            last_seen_at=now,
        )
        active[path] = row
        entries.append(_entry(subject, ChangeType.ALARM_RAISED, row))
    for path in changes.seen_again:
        row = active[path]
        row.last_seen_at = now
        await row.save(using_db=conn, update_fields=["last_seen_at"])
    for path in changes.cleared:
        row = active.pop(path)
        row.active, row.cleared_at = False, now
        await row.save(using_db=conn, update_fields=["active", "cleared_at"])
        entries.append(_entry(subject, ChangeType.ALARM_CLEARED, row))
    return bool(changes), entries


async def _scoped(alarm_id: int, principal: Principal) -> tuple[Alarm, Subject]:
    row = await Alarm.filter(id=alarm_id).first()
    device = await Device.filter(id=row.device_id).first() if row is not None else None
    if row is None or device is None:
        raise NotFound(f"alarm {alarm_id} does not exist")
    subject = view_of(device).subject
    principal.require_device(subject)
    return row, subject


async def get_alarm(alarm_id: int, principal: Principal) -> AlarmView:
    """One alarm, if its device lies within the caller's scope."""
    row, _ = await _scoped(alarm_id, principal)
    return _view(row)


async def acknowledge_alarm(
    alarm_id: int, note: str, principal: Principal, actor: str, notifier: FeedNotifier
) -> AlarmView:
    """Record that `actor` takes care of the alarm."""
    if len(note) > MAX_NOTE:
        raise InvalidArgument(f"note is longer than {MAX_NOTE} characters")
    _, subject = await _scoped(alarm_id, principal)
    async with in_transaction() as conn:
        row = await Alarm.filter(id=alarm_id).using_db(conn).select_for_update().get()
        row.acknowledged_at = datetime.now(UTC)
        row.acknowledged_by = actor[:300]
        row.note = note
        await row.save(using_db=conn, update_fields=["acknowledged_at", "acknowledged_by", "note"])
        await change_feed.append(conn, [_entry(subject, ChangeType.ALARM_ACKNOWLEDGED, row)])
    notifier.wake()
    return _view(row)


async def list_alarms(
    selector: Selector,
    filter_text: str,
    active_only: bool,
    severity: str,
    requested_size: int,
    token: str,
    principal: Principal,
) -> tuple[list[AlarmView], str]:
    """A page of alarms, newest first, of devices matching `selector` within the scope."""
    if selector.uses_twin_values:
        raise InvalidArgument("alarm filters may only use device attributes and labels")
    if severity and severity not in ALARM_SEVERITIES:
        raise InvalidArgument(f"severity must be one of {', '.join(ALARM_SEVERITIES)}")
    size = page_size(requested_size)
    fingerprint = f"{filter_text}|{active_only}|{severity}"
    after = decode_numeric_page_token(token, fingerprint)
    wanted = selector.combine(principal.scope)
    found: list[AlarmView] = []
    more = False
    while not more:
        query = Alarm.all().order_by("-id").limit(size + 1)
        if active_only:
            query = query.filter(active=True)
        if severity:
            query = query.filter(severity=severity)
        if after is not None:
            query = query.filter(id__lt=after)
        rows = await query
        devices = {
            d.id: view_of(d).subject
            for d in await Device.filter(id__in=list({r.device_id for r in rows}))
        }
        for row in rows:
            subject = devices.get(row.device_id)
            if subject is None or not matches(wanted, subject):
                continue
            if len(found) == size:
                more = True
                break
            found.append(_view(row))
        if len(rows) <= size:
            break
        after = rows[-1].id
    next_token = encode_page_token(str(found[-1].id), fingerprint) if more else ""
    return found, next_token


async def watch_alarms(
    notifier: FeedNotifier, selector: Selector, after_cursor: str
) -> AsyncIterator[tuple[ChangeEntry, AlarmView]]:
    """Alarm events of matching devices from the change feed, for ever."""
    if selector.uses_twin_values:
        raise InvalidArgument("alarm filters may only use device attributes and labels")
    async for entry in change_feed.watch(notifier, selector, after_cursor):
        if entry.change_type in ALARM_CHANGES:
            yield entry, AlarmView.from_json(entry.patch)
