"""The provisioning audit log: every enrollment attempt, issuance, renewal, revocation and
administrative change, append-only, newest first when read."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum

from tortoise.backends.base.client import BaseDBAsyncClient

from provisioning.models import AuditEvent
from twin.page_tokens import decode_numeric_page_token, page_size, split_page


class Action(StrEnum):
    """What an audit event records."""

    ENROLL = "enroll"
    RENEW = "renew"
    REVOKE = "revoke"
    ENROLLMENT_CREATE = "enrollment.create"
    ENROLLMENT_CANCEL = "enrollment.cancel"
    GROUP_CREATE = "group.create"
    GROUP_DELETE = "group.delete"
    POLICY_UPDATE = "policy.update"


@dataclass(frozen=True)
class Actor:
    """Who acted and from where: `tokens/{id}`, `device:{id}` or `anonymous`, and an address."""

    name: str
    source: str = ""


@dataclass(frozen=True)
class AuditEntry:
    """One event as read back."""

    id: int
    at: datetime
    action: str
    success: bool
    device_id: str
    serial_number: str
    actor: str
    source: str
    detail: str


_MAX_DETAIL = 1024


async def record(
    action: Action,
    actor: Actor,
    *,
    success: bool,
    device_id: str = "",
    serial_number: str = "",
    detail: str = "",
    conn: BaseDBAsyncClient | None = None,
) -> None:
    """Append one event; inside `conn`'s transaction when given, so that an event about a
    change commits (or not) with the change itself."""
    await AuditEvent.create(
        using_db=conn,
        at=datetime.now(UTC),
        action=action.value,
        success=success,
        device_id=device_id[:63],
        serial_number=serial_number[:128],
        actor=actor.name[:300],
        source=actor.source[:128],
        detail=detail[:_MAX_DETAIL],
    )


async def list_events(
    device_id: str, requested_size: int, token: str
) -> tuple[list[AuditEntry], str]:
    """A page of events, newest first, optionally only those about `device_id`."""
    size = page_size(requested_size)
    after = decode_numeric_page_token(token, device_id)
    query = AuditEvent.all().order_by("-id").limit(size + 1)
    if device_id:
        query = query.filter(device_id=device_id)
    if after is not None:
        query = query.filter(id__lt=after)
    rows, next_token = split_page(await query, size, lambda r: str(r.id), device_id)
    page = [
        AuditEntry(
            id=r.id,
            at=r.at,
            action=r.action,
            success=r.success,
            device_id=r.device_id,
            serial_number=r.serial_number,
            actor=r.actor,
            source=r.source,
            detail=r.detail,
        )
        for r in rows
    ]
    return page, next_token
