"""Reading and writing twin documents: desired state for one device or a whole selection,
and queries. (Device reports, which write the reported document, are report_commits.py.)

A write validates the patch against the device's profile before any lock is taken, then in
one transaction locks the twin row, checks `expected_version`, applies the patch, stamps the
metadata, bumps the version and appends the change-feed entry.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from tortoise.backends.base.client import BaseDBAsyncClient
from tortoise.transactions import in_transaction

from twin import change_feed
from twin.access import Principal
from twin.change_feed import ChangeType, FeedNotifier, NewEntry
from twin.delta import compute_delta
from twin.dimming_schedule import parse_schedule
from twin.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PayloadTooLarge,
    ProfileViolation,
    VersionConflict,
)
from twin.merge_patch import Document, apply_merge_patch, effective_patch
from twin.metadata import format_timestamp, update_metadata
from twin.models import Twin
from twin.profile_store import get_profile
from twin.profiles import validate_patch
from twin.registry import (
    DeviceView,
    LifecycleState,
    get_device,
    page_of_devices,
    scan_devices,
)
from twin.selectors import Selector
from twin.sync_store import updated_sync

DocumentName = Literal["desired", "reported"]
# A whole document may grow by many patches; bound it so one twin cannot eat the database.
MAX_DOCUMENT_BYTES = 256 * 1024
# Devices updated per transaction by a bulk update: each device is still all-or-nothing.
_BULK_CHUNK = 100


@dataclass(frozen=True)
class TwinView:
    """A twin as callers see it, with its delta computed."""

    device_id: str
    desired: Document
    reported: Document
    delta: Document
    desired_metadata: Document
    reported_metadata: Document
    version: int
    updated_at: datetime | None
    sync: dict[str, Any] | None = None
    ack: dict[str, Any] | None = None
    desired_version: int = 0


def view_of_twin(row: Twin) -> TwinView:
    """The TwinView of a database row."""
    return TwinView(
        device_id=row.device_id,
        desired=row.desired,
        reported=row.reported,
        delta=compute_delta(row.desired, row.reported),
        desired_metadata=row.desired_metadata,
        reported_metadata=row.reported_metadata,
        version=row.version,
        updated_at=row.updated_at,
        sync=row.sync,
        ack=row.ack,
        desired_version=row.desired_version,
    )


async def get_twin(device_id: str, principal: Principal) -> TwinView:
    """The twin of one device within the caller's scope."""
    await get_device(device_id, principal)
    return view_of_twin(await Twin.get(device_id=device_id))


async def read_twins(device_ids: Sequence[str]) -> list[TwinView | Exception]:
    """The twins of `device_ids`, in one query, for the devices themselves (whose scope is
    their own twin, so there is nothing to check but existence): each a TwinView, or NotFound
    for a device that has none. Devices read these through GroupedCalls (notifications to
    many observers at once, see device_resources.py)."""
    rows = {row.device_id: row for row in await Twin.filter(device_id__in=sorted(set(device_ids)))}
    return [
        view_of_twin(rows[device_id])
        if device_id in rows
        else NotFound(f"device {device_id!r} does not exist")
        for device_id in device_ids
    ]


async def lock_twins(conn: BaseDBAsyncClient, device_ids: Collection[str]) -> dict[str, Twin]:
    """The twins of `device_ids` by device id, locked for update in the transaction `conn`.
    Every write that locks several twins (and any device rows after them) takes them this
    way, in device id order, so two such transactions cannot deadlock."""
    rows = (
        await Twin.filter(device_id__in=sorted(set(device_ids)))
        .using_db(conn)
        .select_for_update()
        .order_by("device_id")
    )
    return {row.device_id: row for row in rows}


def apply_to_row(
    row: Twin,
    which: DocumentName,
    patch: Document,
    now: datetime,
    timestamps: Document | None = None,
) -> Document:
    """Apply `patch` to one document of `row` in memory, stamping its metadata with `now` (or
    with `timestamps`, a document of times mirroring the patch); returns the effective patch.
    PayloadTooLarge, with `row` untouched, if the document would outgrow its bound."""
    document: Document = getattr(row, which)
    applied = effective_patch(document, patch)
    if not applied:
        return applied
    result = apply_merge_patch(document, applied)
    size = len(json.dumps(result, separators=(",", ":")).encode())
    if size > MAX_DOCUMENT_BYTES:
        raise PayloadTooLarge(
            f"{which} document would be {size} bytes; the limit is {MAX_DOCUMENT_BYTES}"
        )
    setattr(row, which, result)
    metadata_field = f"{which}_metadata"
    setattr(
        row,
        metadata_field,
        update_metadata(getattr(row, metadata_field), applied, timestamps or format_timestamp(now)),
    )
    row.version += 1
    row.updated_at = now
    if which == "desired":
        row.desired_version = row.version
    return applied


# The desired member that carries firmware jobs; only campaigns write it (firmware_ota).
FIRMWARE_JOB = "firmware"


def check_desired_semantics(patch: Document) -> None:
    """Rules beyond a profile's types and ranges: a dimming schedule must be one a lamp can
    run (times, sun events, offsets); the firmware job is left to campaigns, which track
    what they asked for (a job written past them would never be judged or withdrawn). Arrays
    replace whole in a merge patch, so checking the patch's schedule checks the resulting
    one."""
    if FIRMWARE_JOB in patch:
        raise FailedPrecondition(
            "desired.firmware is written by firmware campaigns only (CampaignService)"
        )
    schedule = patch.get("dimming_schedule")
    # Not a list (or null, deleting it) is the profile's to refuse, already done.
    if isinstance(schedule, list):
        try:
            parse_schedule(list(schedule), "desired.dimming_schedule")
        except ValueError as bad:
            raise InvalidArgument(str(bad)) from None


async def update_desired(
    device_id: str,
    patch: Document,
    *,
    expected_version: int,
    principal: Principal,
    notifier: FeedNotifier,
    also: Callable[[BaseDBAsyncClient], Awaitable[None]] | None = None,
    firmware_job: bool = False,
) -> TwinView:
    """Apply a merge patch to one device's desired document; `also` writes more rows in the
    same transaction (such as a campaign's execution row). `firmware_job` marks a campaign
    writing desired.firmware. (Reports, the reported document, go through report_commits.)"""
    device = await get_device(device_id, principal)
    if device.state == LifecycleState.DECOMMISSIONED:
        raise FailedPrecondition(f"device {device_id!r} is decommissioned; its twin is read-only")
    profile = await get_profile(device.model)
    validate_patch(profile, patch, document="desired")
    check_desired_semantics(
        {k: v for k, v in patch.items() if k != FIRMWARE_JOB} if firmware_job else patch
    )
    async with in_transaction() as conn:
        row = await Twin.filter(device_id=device_id).using_db(conn).select_for_update().get()
        if expected_version and row.version != expected_version:
            raise VersionConflict(
                f"twin of {device_id!r} is at version {row.version}, "
                f"not the expected {expected_version}"
            )
        now = datetime.now(UTC)
        applied = apply_to_row(row, "desired", patch, now)
        if also is not None:
            await also(conn)
        entries: list[NewEntry] = []
        if applied:
            entries.append(
                NewEntry(device.subject, ChangeType.DESIRED_UPDATED, row.version, applied)
            )
        sync_changed, sync_entry = updated_sync(
            row, device.subject, online=device.online, ack=None, now=now
        )
        if sync_entry is not None:
            entries.append(sync_entry)
        if applied or sync_changed:
            await row.save(using_db=conn)
        # Last, as change_feed.append wants: its ordering lock is then held only to commit.
        await change_feed.append(conn, entries)
    if applied or sync_changed:
        notifier.wake()
    return view_of_twin(row)


@dataclass(frozen=True)
class BulkResult:
    """What a bulk desired update did."""

    matched: int
    changed: int


async def bulk_update_desired(
    selector: Selector, patch: Document, principal: Principal, notifier: FeedNotifier
) -> BulkResult:
    """Apply one patch to the desired state of every live device the selector matches."""
    if not selector.terms:
        raise InvalidArgument(
            "a bulk update needs a selector; use 'kind in (lamp,sensor,camera)' for every device"
        )
    devices = [
        view
        async for view, _ in scan_devices(selector.combine(principal.scope))
        if view.state != LifecycleState.DECOMMISSIONED
    ]
    check_desired_semantics(patch)
    # Refuse the whole update up front if any matched model cannot take the patch.
    for model in sorted({d.model for d in devices}):
        try:
            validate_patch(await get_profile(model), patch, document="desired")
        except ProfileViolation as violation:
            raise ProfileViolation(violation.path, f"{violation.reason} (model {model})") from None
    changed = 0
    for start in range(0, len(devices), _BULK_CHUNK):
        async with in_transaction() as conn:
            changed += await _bulk_chunk(conn, devices[start : start + _BULK_CHUNK], patch)
        notifier.wake()
    return BulkResult(matched=len(devices), changed=changed)


async def _bulk_chunk(
    conn: BaseDBAsyncClient, devices: Sequence[DeviceView], patch: Document
) -> int:
    by_id = {d.id: d for d in devices}
    rows = (await lock_twins(conn, list(by_id))).values()
    now = datetime.now(UTC)
    entries: list[NewEntry] = []
    for row in rows:
        applied = apply_to_row(row, "desired", patch, now)
        if applied:
            device = by_id[row.device_id]
            entries.append(
                NewEntry(device.subject, ChangeType.DESIRED_UPDATED, row.version, applied)
            )
            _, sync_entry = updated_sync(
                row, device.subject, online=device.online, ack=None, now=now
            )
            if sync_entry is not None:
                entries.append(sync_entry)
            await row.save(using_db=conn)
    # One append per chunk: the feed lock is taken once, not once per device.
    await change_feed.append(conn, entries)
    return sum(1 for e in entries if e.change_type is ChangeType.DESIRED_UPDATED)


async def query_twins(
    selector: Selector, filter_text: str, requested_size: int, token: str, principal: Principal
) -> tuple[list[TwinView], str]:
    """A page of twins whose devices match selector (within scope), and the next token."""
    page, next_token = await page_of_devices(
        selector, filter_text, requested_size, token, principal
    )
    # The scan loads twins only when the selector tests twin values; fetch the rest at once.
    ids = [view.id for view, twin in page if twin is None]
    loaded = {t.device_id: t for t in await Twin.filter(device_id__in=ids)} if ids else {}
    return [view_of_twin(twin or loaded[view.id]) for view, twin in page], next_token
