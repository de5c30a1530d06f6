"""Committing device reports: the reported state, acknowledgements, telemetry samples, sync
status and alarms they change, many reports per transaction.

The device side queues its reports in one `report_committer` per process (group commit, see
grouped_calls.py): one read of the devices, one locking read of their twins, one read of
their active alarms, one feed insert and one commit for the whole group. A report still waits
for its commit before the device gets its 2.04, and the reports of one process are applied
in the order they were queued.

Every report in a group succeeds or fails on its own: what can be refused (an unknown or
decommissioned device, a profile violation, a bad `$ack`, a stale `expected_version`, a
document outgrowing its bound) is found before anything of that report is written.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from tortoise.backends.base.client import BaseDBAsyncClient
from tortoise.transactions import in_transaction

from twin import change_feed
from twin.access import Principal
from twin.alarm_store import active_alarms, apply_report
from twin.change_feed import ChangeType, FeedNotifier, NewEntry
from twin.errors import CitytwinError, FailedPrecondition, NotFound, VersionConflict
from twin.grouped_calls import GroupedCalls
from twin.merge_patch import Document
from twin.metadata import drop_superseded
from twin.models import Alarm, Device, TelemetrySample, Twin
from twin.profile_store import get_profile
from twin.profiles import Profile, validate_patch
from twin.reconciliation import Acknowledgement, split_acknowledgement
from twin.registry import DeviceView, LifecycleState, set_lifecycle_state, view_of
from twin.sync_store import ack_to_json, updated_sync
from twin.twin_store import TwinView, apply_to_row, lock_twins, view_of_twin

# Reports per transaction at most: enough to share the fixed cost, few enough that the row
# locks of one group are not held for long.
MAX_GROUP = 100
# Reports waiting at most; more are refused with 4.29 (a second's worth of a busy server).
MAX_QUEUED = 2_000


@dataclass(frozen=True)
class Report:
    """One report of one device: a merge patch of its reported state, perhaps with an `$ack`
    of a desired version; telemetry adds the samples to keep and the time each value was
    measured (then a value older than the one stored is not applied, see metadata.py)."""

    device_id: str
    patch: Document
    principal: Principal
    expected_version: int = 0
    samples: Sequence[TelemetrySample] = ()
    measured_at: Document | None = None


@dataclass(frozen=True)
class _Checked:
    """A report that passed every check that needs no lock."""

    index: int
    report: Report
    device: DeviceView
    profile: Profile
    patch: Document
    ack: Acknowledgement | None


Outcome = TwinView | Exception


async def commit_reports(reports: Sequence[Report], notifier: FeedNotifier) -> list[Outcome]:
    """Commit `reports` in one transaction; for each, in order, the twin right after it was
    applied, or the CitytwinError that refused it. A database failure raises (nothing of
    the group is stored then)."""
    outcomes: list[Outcome | None] = [None] * len(reports)
    ids = sorted({report.device_id for report in reports})
    devices = {row.id: view_of(row) for row in await Device.filter(id__in=ids)}
    checked: list[_Checked] = []
    for index, report in enumerate(reports):
        try:
            checked.append(await _check(index, report, devices.get(report.device_id)))
        except CitytwinError as refused:
            outcomes[index] = refused
    changed = False
    if checked:
        async with in_transaction() as conn:
            changed = await _write(conn, checked, outcomes)
    if changed:
        notifier.wake()
    assert all(outcome is not None for outcome in outcomes)
    return [outcome for outcome in outcomes if outcome is not None]


async def commit_report(report: Report, notifier: FeedNotifier) -> TwinView:
    """Commit one report on its own; raises what refused it."""
    (outcome,) = await commit_reports([report], notifier)
    if isinstance(outcome, Exception):
        raise outcome
    return outcome


async def _check(index: int, report: Report, device: DeviceView | None) -> _Checked:
    if device is None:
        raise NotFound(f"device {report.device_id!r} does not exist")
    report.principal.require_device(device.subject)
    if device.state == LifecycleState.DECOMMISSIONED:
        raise FailedPrecondition(f"device {device.id!r} is decommissioned; its twin is read-only")
    # A report may answer a desired version (`$ack`); the rest is the reported patch.
    patch, ack = split_acknowledgement(report.patch)
    profile = await get_profile(device.model)
    validate_patch(profile, patch, document="reported")
    return _Checked(index, report, device, profile, patch, ack)


@dataclass
class _Group:
    """What the reports of one transaction add up to, written once at its end."""

    dirty: dict[str, Twin] = field(default_factory=dict)
    samples: list[TelemetrySample] = field(default_factory=list)
    entries: list[NewEntry] = field(default_factory=list)
    activated: set[str] = field(default_factory=set)
    alarms_changed: bool = False


async def _write(
    conn: BaseDBAsyncClient, checked: Sequence[_Checked], outcomes: list[Outcome | None]
) -> bool:
    rows = await lock_twins(conn, [item.device.id for item in checked])
    alarms = await active_alarms(
        conn, sorted({item.device.id for item in checked if item.profile.fault_properties})
    )
    group = _Group()
    now = datetime.now(UTC)
    for item in checked:
        row = rows[item.device.id]
        try:
            outcomes[item.index] = await _apply(conn, item, row, alarms, group, now)
        except CitytwinError as refused:
            outcomes[item.index] = refused
    for row in group.dirty.values():
        await row.save(using_db=conn)
    if group.samples:
        await TelemetrySample.bulk_create(group.samples, using_db=conn)
    # Last, as change_feed.append wants: its ordering lock is then held only to commit.
    await change_feed.append(conn, group.entries)
    return bool(group.dirty or group.activated or group.alarms_changed)


async def _apply(
    conn: BaseDBAsyncClient,
    item: _Checked,
    row: Twin,
    alarms: dict[str, dict[str, Alarm]],
    group: _Group,
    now: datetime,
) -> TwinView:
    """One report onto its (locked) twin row, in memory but for alarms and the lifecycle."""
    report, device = item.report, item.device
    if report.expected_version and row.version != report.expected_version:
        raise VersionConflict(
            f"twin of {device.id!r} is at version {row.version}, "
            f"not the expected {report.expected_version}"
        )
    patch, times = item.patch, report.measured_at
    if times is not None:
        patch = drop_superseded(patch, times, row.reported_metadata)
    applied = apply_to_row(row, "reported", patch, now, times)
    group.samples.extend(report.samples)
    # The first report makes the device ACTIVE, even one that changes nothing.
    if device.state != LifecycleState.ACTIVE and device.id not in group.activated:
        group.activated.add(device.id)
        await set_lifecycle_state(conn, device.id, LifecycleState.ACTIVE)
    if applied:
        group.entries.append(
            NewEntry(device.subject, ChangeType.REPORTED_UPDATED, row.version, applied)
        )
    if item.ack is not None:
        row.ack = ack_to_json(item.ack)
    sync_changed, sync_entry = updated_sync(
        row, device.subject, online=device.online, ack=item.ack, now=now
    )
    if sync_entry is not None:
        group.entries.append(sync_entry)
    if applied or item.ack is not None or sync_changed:
        group.dirty[device.id] = row
    if device.id in alarms:
        changed, entries = await apply_report(
            conn, item.profile, device.subject, row.reported, item.patch, now, alarms[device.id]
        )
        group.alarms_changed |= changed
        group.entries.extend(entries)
    return view_of_twin(row)


def report_committer(notifier: FeedNotifier) -> GroupedCalls[Report, TwinView]:
    """The committer a process's device side queues its reports in."""
    return GroupedCalls(
        functools.partial(commit_reports, notifier=notifier),
        max_group=MAX_GROUP,
        name="report commits",
        max_queued=MAX_QUEUED,
    )
