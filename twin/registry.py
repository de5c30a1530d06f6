"""The device registry: creating, reading, listing, relabelling and decommissioning devices.

Every change is written together with its change-feed entry in one transaction.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from tortoise.backends.base.client import BaseDBAsyncClient
from tortoise.exceptions import IntegrityError
from tortoise.transactions import in_transaction

from twin import change_feed
from twin.access import Principal
from twin.change_feed import ChangeType, FeedNotifier, NewEntry
from twin.delta import has_delta
from twin.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from twin.models import Device, Twin
from twin.page_tokens import decode_page_token, page_size, split_page
from twin.profile_store import get_profile
from twin.selectors import KINDS, Selector, Subject, matches
from twin.sync_store import sync_state_of

DEVICE_ID = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
LABEL_KEY = re.compile(r"[a-z0-9]([a-z0-9_-]{0,61}[a-z0-9])?")
MAX_LABELS = 64


class LifecycleState(StrEnum):
    """Where a device is in its life (mirrors citytwin.v1.LifecycleState)."""

    REGISTERED = "registered"
    PROVISIONED = "provisioned"
    ACTIVE = "active"
    DECOMMISSIONED = "decommissioned"


@dataclass(frozen=True)
class Location:
    """Where a device is mounted."""

    latitude: float | None = None
    longitude: float | None = None
    site_id: str = ""


@dataclass(frozen=True)
class DeviceView:
    """A device as callers see it."""

    id: str
    kind: str
    model: str
    serial_number: str
    labels: Mapping[str, str] = field(default_factory=dict)
    location: Location = Location()
    state: str = LifecycleState.REGISTERED.value
    created_at: datetime | None = None
    updated_at: datetime | None = None
    last_seen_at: datetime | None = None
    online: bool = False

    @property
    def subject(self) -> Subject:
        """The device as selectors see it."""
        return Subject(
            id=self.id,
            kind=self.kind,
            model=self.model,
            state=self.state,
            serial=self.serial_number,
            site=self.location.site_id,
            labels=self.labels,
            online=self.online,
        )

    def to_json(self) -> dict[str, Any]:
        """The form stored in change-feed entries."""
        return {
            "id": self.id,
            "kind": self.kind,
            "model": self.model,
            "serial_number": self.serial_number,
            "labels": dict(self.labels),
            "location": {
                "latitude": self.location.latitude,
                "longitude": self.location.longitude,
                "site_id": self.location.site_id,
            },
            "state": self.state,
            "created_at": _iso(self.created_at),
            "updated_at": _iso(self.updated_at),
            "last_seen_at": _iso(self.last_seen_at),
            "online": self.online,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> DeviceView:
        """Inverse of to_json."""
        return cls(
            id=data["id"],
            kind=data["kind"],
            model=data["model"],
            serial_number=data["serial_number"],
            labels=data["labels"],
            location=Location(**data["location"]),
            state=data["state"],
            created_at=_from_iso(data["created_at"]),
            updated_at=_from_iso(data["updated_at"]),
            last_seen_at=_from_iso(data["last_seen_at"]),
            online=bool(data.get("online", False)),
        )


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment else None


def _from_iso(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text) if text else None


def view_of(row: Device) -> DeviceView:
    """The DeviceView of a database row."""
    return DeviceView(
        id=row.id,
        kind=row.kind,
        model=row.model,
        serial_number=row.serial_number,
        labels=row.labels,
        location=Location(row.latitude, row.longitude, row.site_id),
        state=row.state,
        created_at=row.created_at,
        updated_at=row.updated_at,
        last_seen_at=row.last_seen_at,
        online=row.online,
    )


def check_labels(labels: Mapping[str, str]) -> None:
    """InvalidArgument naming the first bad label, if any."""
    if len(labels) > MAX_LABELS:
        raise InvalidArgument(f"a device has at most {MAX_LABELS} labels")
    for key, value in labels.items():
        if not LABEL_KEY.fullmatch(key):
            raise InvalidArgument(
                f"label key {key!r} must be 1-63 lower-case letters, digits, '_' or '-'"
            )
        if len(value) > 255:
            raise InvalidArgument(f"label {key!r}: value longer than 255 characters")


def check_location(location: Location) -> None:
    """InvalidArgument if the coordinates or site id are out of range."""
    if location.latitude is not None and not -90 <= location.latitude <= 90:
        raise InvalidArgument(f"location.latitude {location.latitude} is not within -90..90")
    if location.longitude is not None and not -180 <= location.longitude <= 180:
        raise InvalidArgument(f"location.longitude {location.longitude} is not within -180..180")
    if len(location.site_id) > 128:
        raise InvalidArgument("location.site_id is longer than 128 characters")


async def _load(
    device_id: str, principal: Principal, lock_in: BaseDBAsyncClient | None = None
) -> Device:
    """The device row, if it exists and lies within the caller's scope; locked for update
    when read inside the transaction `lock_in`."""
    query = Device.filter(id=device_id)
    if lock_in is not None:
        query = query.using_db(lock_in).select_for_update()
    row = await query.first()
    if row is None:
        raise NotFound(f"device {device_id!r} does not exist")
    principal.require_device(view_of(row).subject)
    return row


async def new_device(device: DeviceView, principal: Principal) -> DeviceView:
    """Check a device to be registered (its id generated if empty) and return it as it will
    be stored, REGISTERED; nothing is written."""
    device_id = device.id or "d-" + secrets.token_hex(6)
    if not DEVICE_ID.fullmatch(device_id):
        raise InvalidArgument(
            f"device_id {device_id!r} must be 1-63 lower-case letters, digits or '-', "
            "starting and ending with a letter or digit"
        )
    if device.kind not in KINDS:
        raise InvalidArgument("device.kind is required (LAMP, SENSOR or CAMERA)")
    if not device.model:
        raise InvalidArgument("device.model is required")
    if not device.serial_number or len(device.serial_number) > 128:
        raise InvalidArgument("device.serial_number is required (at most 128 characters)")
    check_labels(device.labels)
    check_location(device.location)
    try:
        profile = await get_profile(device.model)
    except NotFound as missing:
        raise InvalidArgument(f"device.model: {missing}; register a profile first") from None
    if profile.kind != device.kind:
        raise InvalidArgument(f"model {device.model!r} is a {profile.kind}, not a {device.kind}")
    now = datetime.now(UTC)
    view = replace(
        device,
        id=device_id,
        state=LifecycleState.REGISTERED.value,
        created_at=now,
        updated_at=now,
        last_seen_at=None,
    )
    principal.require_device(view.subject)
    return view


async def insert_device(conn: BaseDBAsyncClient, view: DeviceView) -> None:
    """Store a device checked by `new_device`, its empty twin and its feed entry, inside the
    caller's transaction; AlreadyExists if the id or serial number is taken."""
    try:
        # A savepoint, so that a duplicate leaves the caller's transaction usable on PostgreSQL.
        async with in_transaction(conn.connection_name) as inner:
            await Device.create(
                using_db=inner,
                id=view.id,
                kind=view.kind,
                model=view.model,
                serial_number=view.serial_number,
                labels=dict(view.labels),
                latitude=view.location.latitude,
                longitude=view.location.longitude,
                site_id=view.location.site_id,
                state=view.state,
                created_at=view.created_at,
                updated_at=view.updated_at,
            )
    except IntegrityError:
        taken = await Device.filter(id=view.id).using_db(conn).exists()
        what = f"id {view.id!r}" if taken else f"serial number {view.serial_number!r}"
        raise AlreadyExists(f"a device with {what} exists already") from None
    await Twin.create(using_db=conn, device_id=view.id)
    await change_feed.append(
        conn, [NewEntry(view.subject, ChangeType.DEVICE_CREATED, device=view.to_json())]
    )


async def create_device(
    device: DeviceView, principal: Principal, notifier: FeedNotifier
) -> DeviceView:
    """Register a device (and its empty twin); its id is generated if empty."""
    view = await new_device(device, principal)
    async with in_transaction() as conn:
        await insert_device(conn, view)
    notifier.wake()
    return view


async def set_lifecycle_state(
    conn: BaseDBAsyncClient, device_id: str, state: LifecycleState
) -> DeviceView:
    """Move a device to `state` inside the caller's transaction (no scope check: for the
    service's own flows such as provisioning). A change is recorded in the change feed."""
    row = await Device.filter(id=device_id).using_db(conn).select_for_update().first()
    if row is None:
        raise NotFound(f"device {device_id!r} does not exist")
    if row.state == state:
        return view_of(row)
    row.state = state.value
    row.updated_at = datetime.now(UTC)
    await row.save(using_db=conn, update_fields=["state", "updated_at"])
    view = view_of(row)
    await change_feed.append(
        conn, [NewEntry(view.subject, ChangeType.DEVICE_UPDATED, device=view.to_json())]
    )
    return view


async def get_device(device_id: str, principal: Principal) -> DeviceView:
    """One device, if it exists and lies within the caller's scope."""
    return view_of(await _load(device_id, principal))


async def page_of_devices(
    selector: Selector, filter_text: str, requested_size: int, token: str, principal: Principal
) -> tuple[list[tuple[DeviceView, Twin | None]], str]:
    """A page of (device, twin if loaded) matching selector within the caller's scope, and
    the token of the next page ("" on the last)."""
    size = page_size(requested_size)
    after = decode_page_token(token, filter_text)
    scope = selector.combine(principal.scope)
    found = [pair async for pair in scan_devices(scope, after, limit=size + 1)]
    return split_page(found, size, lambda pair: pair[0].id, filter_text)


async def list_devices(
    selector: Selector, filter_text: str, requested_size: int, token: str, principal: Principal
) -> tuple[list[DeviceView], str]:
    """A page of devices matching selector (within the caller's scope), and the next token."""
    page, next_token = await page_of_devices(
        selector, filter_text, requested_size, token, principal
    )
    return [view for view, _ in page], next_token


async def scan_devices(
    selector: Selector, after_id: str = "", *, limit: int | None = None, batch: int = 500
) -> AsyncIterator[tuple[DeviceView, Twin | None]]:
    """Yield (DeviceView, Twin | None) in id order for devices matching `selector`.

    Exact attribute terms are pushed into SQL; the selector itself is the authority. The twin
    is loaded only when the selector tests twin values.
    """
    prefilter = {
        {"serial": "serial_number"}.get(k, k): v for k, v in selector.exact_attributes().items()
    }
    yielded = 0
    while True:
        query = Device.filter(**prefilter).order_by("id").limit(batch)
        if after_id:
            query = query.filter(id__gt=after_id)
        rows = await query
        twins: dict[str, Twin] = {}
        if selector.uses_twin_values and rows:
            twins = {t.device_id: t for t in await Twin.filter(device_id__in=[r.id for r in rows])}
        for row in rows:
            view = view_of(row)
            twin = twins.get(row.id)
            if matches(selector, _subject_with_twin(view, twin)):
                yield view, twin
                yielded += 1
                if limit is not None and yielded >= limit:
                    return
        if len(rows) < batch:
            return
        after_id = rows[-1].id


def _subject_with_twin(view: DeviceView, twin: Twin | None) -> Subject:
    if twin is None:
        return view.subject
    return replace(
        view.subject,
        desired=twin.desired,
        reported=twin.reported,
        has_delta=has_delta(twin.desired, twin.reported),
        sync=sync_state_of(twin.sync),
    )


async def update_device(
    device_id: str,
    *,
    labels: Mapping[str, str] | None,
    location: Location | None,
    principal: Principal,
    notifier: FeedNotifier,
) -> DeviceView:
    """Replace the labels and/or location of a device."""
    if labels is not None:
        check_labels(labels)
    if location is not None:
        check_location(location)
    async with in_transaction() as conn:
        row = await _load(device_id, principal, lock_in=conn)
        if row.state == LifecycleState.DECOMMISSIONED:
            raise FailedPrecondition(f"device {device_id!r} is decommissioned")
        if labels is not None:
            row.labels = dict(labels)
        if location is not None:
            row.latitude, row.longitude = location.latitude, location.longitude
            row.site_id = location.site_id
        # An installer may not move a device out of their own reach.
        principal.require_device(view_of(row).subject)
        row.updated_at = datetime.now(UTC)
        await row.save(using_db=conn)
        view = view_of(row)
        await change_feed.append(
            conn, [NewEntry(view.subject, ChangeType.DEVICE_UPDATED, device=view.to_json())]
        )
    notifier.wake()
    return view


async def decommission_device(
    device_id: str, principal: Principal, notifier: FeedNotifier
) -> DeviceView:
    """Move a device to DECOMMISSIONED (idempotent)."""
    async with in_transaction() as conn:
        row = await _load(device_id, principal, lock_in=conn)
        if row.state == LifecycleState.DECOMMISSIONED:
            return view_of(row)
        row.state = LifecycleState.DECOMMISSIONED.value
        row.updated_at = datetime.now(UTC)
        await row.save(using_db=conn)
        view = view_of(row)
        await change_feed.append(
            conn,
            [NewEntry(view.subject, ChangeType.DEVICE_DECOMMISSIONED, device=view.to_json())],
        )
    notifier.wake()
    return view
