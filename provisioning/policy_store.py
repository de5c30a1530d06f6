"""The provisioning policy's single database row."""

from __future__ import annotations

from dataclasses import asdict
from datetime import UTC, datetime

from tortoise.transactions import in_transaction

from provisioning import audit_log
from provisioning.audit_log import Action, Actor
from provisioning.models import ProvisioningPolicyRow
from provisioning.policy import Policy, updated_policy

_ROW_ID = 1


def _policy_of(row: ProvisioningPolicyRow) -> Policy:
    return Policy(
        certificate_validity_days=row.certificate_validity_days,
        renewal_window_days=row.renewal_window_days,
        default_code_ttl_seconds=row.default_code_ttl_seconds,
        max_code_ttl_seconds=row.max_code_ttl_seconds,
    )


async def load_policy() -> tuple[Policy, datetime | None]:
    """The policy in force and when it last changed (None: never changed, defaults)."""
    row = await ProvisioningPolicyRow.filter(id=_ROW_ID).first()
    if row is None:
        return Policy(), None
    return _policy_of(row), row.updated_at


async def update_policy(changes: dict[str, int], actor: Actor) -> tuple[Policy, datetime]:
    """Apply `changes` to the policy, atomically with respect to other writers, and audit it."""
    async with in_transaction() as conn:
        row = (
            await ProvisioningPolicyRow.filter(id=_ROW_ID)
            .using_db(conn)
            .select_for_update()
            .first()
        )
        current = Policy() if row is None else _policy_of(row)
        new = updated_policy(current, changes)
        now = datetime.now(UTC)
        await ProvisioningPolicyRow.update_or_create(
            id=_ROW_ID, defaults={**asdict(new), "updated_at": now}, using_db=conn
        )
        detail = ", ".join(f"{k}={v}" for k, v in sorted(changes.items()))
        await audit_log.record(Action.POLICY_UPDATE, actor, success=True, detail=detail, conn=conn)
    return new, now
