"""Installer enrollments: a registered device plus a one-time code that lets it obtain its
first certificate. Codes are stored only as hashes bound to the device's serial number."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum

from tortoise.backends.base.client import BaseDBAsyncClient
from tortoise.transactions import in_transaction

from provisioning import audit_log
from provisioning.audit_log import Action, Actor
from provisioning.enrollment_codes import (
    EnrollmentWindow,
    codes_match,
    expiry,
    hash_code,
    new_code,
    usable,
)
from provisioning.models import Enrollment
from provisioning.policy import code_ttl
from provisioning.policy_store import load_policy
from twin.access import Principal
from twin.change_feed import FeedNotifier
from twin.errors import FailedPrecondition, NotFound, PermissionDenied
from twin.models import Device
from twin.page_tokens import decode_numeric_page_token, encode_page_token, page_size
from twin.registry import DeviceView, insert_device, new_device, view_of
from twin.selectors import matches


class EnrollmentState(StrEnum):
    """Where an enrollment stands; EXPIRED is derived from the expiry time when read."""

    PENDING = "pending"
    USED = "used"
    CANCELLED = "cancelled"
    EXPIRED = "expired"


@dataclass(frozen=True)
class EnrollmentView:
    """An enrollment as callers see it (never the code)."""

    id: int
    device_id: str
    serial_number: str
    state: EnrollmentState
    creator: str
    created_at: datetime
    expires_at: datetime
    ended_at: datetime | None


def _window(row: Enrollment) -> EnrollmentWindow:
    return EnrollmentWindow(
        created_at=row.created_at,
        expires_at=row.expires_at,
        used_at=row.ended_at if row.state == EnrollmentState.USED else None,
        cancelled_at=row.ended_at if row.state == EnrollmentState.CANCELLED else None,
    )


def _view(row: Enrollment, now: datetime) -> EnrollmentView:
    state = EnrollmentState(row.state)
    if state == EnrollmentState.PENDING and usable(_window(row), now) == "expired":
        state = EnrollmentState.EXPIRED
    return EnrollmentView(
        id=row.id,
        device_id=row.device_id,
        serial_number=row.serial_number,
        state=state,
        creator=row.creator,
        created_at=row.created_at,
        expires_at=row.expires_at,
        ended_at=row.ended_at,
    )


async def create_enrollment(
    device: DeviceView,
    ttl_seconds: int,
    principal: Principal,
    actor: Actor,
    notifier: FeedNotifier,
) -> tuple[EnrollmentView, DeviceView, str]:
    """Register `device` (REGISTERED) with a fresh one-time code, in one transaction.
    Returns the enrollment, the device and the code, which is never stored or shown again."""
    policy, _ = await load_policy()
    ttl = code_ttl(policy, ttl_seconds)
    view = await new_device(device, principal)
    code = new_code()
    now = datetime.now(UTC)
    async with in_transaction() as conn:
        await insert_device(conn, view)
        row = await Enrollment.create(
            using_db=conn,
            device_id=view.id,
            serial_number=view.serial_number,
            code_hash=hash_code(code, view.serial_number),
            state=EnrollmentState.PENDING.value,
            creator=actor.name,
            created_at=now,
            expires_at=expiry(now, ttl),
        )
        await audit_log.record(
            Action.ENROLLMENT_CREATE,
            actor,
            success=True,
            device_id=view.id,
            serial_number=view.serial_number,
            detail=f"enrollments/{row.id}, code valid for {ttl} s",
            conn=conn,
        )
    notifier.wake()
    return _view(row, now), view, code


async def _load(enrollment_id: int, principal: Principal) -> Enrollment:
    row = await Enrollment.filter(id=enrollment_id).first()
    if row is None:
        raise NotFound(f"enrollment {enrollment_id} does not exist")
    device = await Device.filter(id=row.device_id).first()
    if device is not None:
        principal.require_device(view_of(device).subject)
    return row


async def _visible(device_ids: set[str], principal: Principal) -> set[str]:
    """The subset of `device_ids` within the caller's scope."""
    if not principal.scope.terms:
        return device_ids
    rows = await Device.filter(id__in=list(device_ids))
    return {r.id for r in rows if matches(principal.scope, view_of(r).subject)}


async def get_enrollment(enrollment_id: int, principal: Principal) -> EnrollmentView:
    """One enrollment, if it exists and its device lies within the caller's scope."""
    return _view(await _load(enrollment_id, principal), datetime.now(UTC))


async def list_enrollments(
    device_id: str,
    state: EnrollmentState | None,
    requested_size: int,
    token: str,
    principal: Principal,
) -> tuple[list[EnrollmentView], str]:
    """A page of enrollments, newest first, filtered by device and state, within scope."""
    size = page_size(requested_size)
    filter_text = f"{device_id}|{state or ''}"
    after = decode_numeric_page_token(token, filter_text)
    now = datetime.now(UTC)
    found: list[EnrollmentView] = []
    more = False
    while True:
        query = Enrollment.all().order_by("-id").limit(size + 1)
        if device_id:
            query = query.filter(device_id=device_id)
        if state in (EnrollmentState.USED, EnrollmentState.CANCELLED):
            query = query.filter(state=state.value)
        elif state == EnrollmentState.PENDING:
            query = query.filter(state=state.value, expires_at__gt=now)
        elif state == EnrollmentState.EXPIRED:
            query = query.filter(state=EnrollmentState.PENDING.value, expires_at__lte=now)
        if after is not None:
            query = query.filter(id__lt=after)
        rows = await query
        visible = await _visible({r.device_id for r in rows}, principal)
        for row in rows:
            if row.device_id in visible:
                if len(found) == size:
                    more = True
                    break
                found.append(_view(row, now))
        if more or len(rows) <= size:
            break
        after = rows[-1].id
    next_token = encode_page_token(str(found[-1].id), filter_text) if more else ""
    return found, next_token


async def cancel_enrollment(
    enrollment_id: int, principal: Principal, actor: Actor
) -> EnrollmentView:
    """Make a pending enrollment's code stop working; a no-op on a cancelled one."""
    await _load(enrollment_id, principal)
    now = datetime.now(UTC)
    async with in_transaction() as conn:
        row = await Enrollment.filter(id=enrollment_id).using_db(conn).select_for_update().first()
        if row is None:
            raise NotFound(f"enrollment {enrollment_id} does not exist")
        if row.state == EnrollmentState.USED:
            raise FailedPrecondition(f"enrollment {enrollment_id} was used already")
        if row.state == EnrollmentState.PENDING:
            row.state = EnrollmentState.CANCELLED.value
            row.ended_at = now
            await row.save(using_db=conn, update_fields=["state", "ended_at"])
            await audit_log.record(
                Action.ENROLLMENT_CANCEL,
                actor,
                success=True,
                device_id=row.device_id,
                serial_number=row.serial_number,
                detail=f"enrollments/{row.id}",
                conn=conn,
            )
    return _view(row, now)


async def redeem_code(
    conn: BaseDBAsyncClient, serial_number: str, code: str, now: datetime
) -> Enrollment:
    """Inside the caller's transaction, find the pending enrollment for `serial_number`
    whose code is `code` and mark it used. PermissionDenied says why not otherwise."""
    rows = (
        await Enrollment.filter(serial_number=serial_number)
        .using_db(conn)
        .select_for_update()
        .order_by("-id")
    )
    for row in rows:
        if not codes_match(row.code_hash, code, serial_number):
            continue
        reason = usable(_window(row), now)
        if reason is not None:
            raise PermissionDenied(f"enrollment code for serial number {serial_number} is {reason}")
        row.state = EnrollmentState.USED.value
        row.ended_at = now
        await row.save(using_db=conn, update_fields=["state", "ended_at"])
        return row
    raise PermissionDenied(f"enrollment code is not valid for serial number {serial_number}")
