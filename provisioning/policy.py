"""The provisioning policy: how long certificates and enrollment codes live, and when a
certificate may be renewed. Plain data and the rules that check it."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from datetime import datetime, timedelta

from provisioning.enrollment_codes import MAX_TTL_SECONDS, MIN_TTL_SECONDS
from twin.errors import InvalidArgument

MAX_VALIDITY_DAYS = 3650


@dataclass(frozen=True)
class Policy:
    """Rules shared by all replicas (one row in the database)."""

    certificate_validity_days: int = 365
    renewal_window_days: int = 30
    default_code_ttl_seconds: int = 24 * 3600
    max_code_ttl_seconds: int = MAX_TTL_SECONDS


UPDATABLE_FIELDS = frozenset(f.name for f in fields(Policy))


def check_policy(policy: Policy) -> None:
    """Raise InvalidArgument naming the first field out of its bounds."""
    if not 1 <= policy.certificate_validity_days <= MAX_VALIDITY_DAYS:
        raise InvalidArgument(f"certificate_validity_days must be 1..{MAX_VALIDITY_DAYS}")
    if not 0 <= policy.renewal_window_days <= policy.certificate_validity_days:
        raise InvalidArgument("renewal_window_days must be 0..certificate_validity_days")
    if not MIN_TTL_SECONDS <= policy.max_code_ttl_seconds <= MAX_TTL_SECONDS:
        raise InvalidArgument(f"max_code_ttl_seconds must be {MIN_TTL_SECONDS}..{MAX_TTL_SECONDS}")
    if not MIN_TTL_SECONDS <= policy.default_code_ttl_seconds <= policy.max_code_ttl_seconds:
        raise InvalidArgument(
            f"default_code_ttl_seconds must be {MIN_TTL_SECONDS}..max_code_ttl_seconds"
        )


def updated_policy(current: Policy, changes: dict[str, int]) -> Policy:
    """`current` with `changes` applied and checked; unknown fields are InvalidArgument."""
    if not changes:
        raise InvalidArgument("update_mask must name at least one field")
    unknown = sorted(set(changes) - UPDATABLE_FIELDS)
    if unknown:
        expected = ", ".join(sorted(UPDATABLE_FIELDS))
        raise InvalidArgument(f"update_mask: unknown field {unknown[0]!r} (expected {expected})")
    new = replace(current, **changes)
    check_policy(new)
    return new


def code_ttl(policy: Policy, requested_seconds: int) -> int:
    """The TTL to give a new enrollment code: the requested one (0 = the default), bounded."""
    if requested_seconds == 0:
        return policy.default_code_ttl_seconds
    if not MIN_TTL_SECONDS <= requested_seconds <= policy.max_code_ttl_seconds:
        raise InvalidArgument(
            f"code_ttl_seconds must be {MIN_TTL_SECONDS}..{policy.max_code_ttl_seconds}"
        )
    return requested_seconds


def renewal_refusal(policy: Policy, not_after: datetime, now: datetime) -> str | None:
    """Why a certificate expiring at `not_after` may not be renewed at `now`, or None."""
    if policy.renewal_window_days == 0:
        return None
    opens = not_after - timedelta(days=policy.renewal_window_days)
    if now < opens:
        return (
            f"renewal opens {opens.isoformat(timespec='seconds')} "
            f"({policy.renewal_window_days} days before the certificate expires)"
        )
    return None
