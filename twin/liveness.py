"""Device liveness from heartbeats: the rule for when a silent device counts as offline.

Pure logic, no I/O. A device is online while its last sign of life is at most
`heartbeat_interval * tolerance` old; the tolerance (>= 1) forgives a late or lost heartbeat.
liveness_store.py applies it in SQL: every online device last seen before `silent_since` is
marked offline.
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta


def _require_aware(moment: datetime, name: str) -> None:
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"{name} must be an aware datetime")


def check_tolerance(tolerance: float) -> None:
    """ValueError unless `tolerance` is a finite number of at least 1."""
    # Written so that NaN fails too; infinity would make every device immortal.
    if not (math.isfinite(tolerance) and tolerance >= 1):
        raise ValueError(f"tolerance must be a finite number >= 1, not {tolerance!r}")


def _allowance(heartbeat_interval_seconds: float, tolerance: float) -> timedelta:
    """How long a device may stay silent and still count as online."""
    if not (math.isfinite(heartbeat_interval_seconds) and heartbeat_interval_seconds > 0):
        raise ValueError(
            f"heartbeat_interval_seconds must be a finite number > 0, "
            f"not {heartbeat_interval_seconds!r}"
        )
    try:
        return timedelta(seconds=heartbeat_interval_seconds * tolerance)
    except OverflowError:
        raise ValueError(
            f"heartbeat allowance {heartbeat_interval_seconds!r} s x {tolerance!r} is too long"
        ) from None


def silent_since(heartbeat_interval_seconds: float, tolerance: float, now: datetime) -> datetime:
    """The moment before which a device must have been seen to count as online at `now`: a
    device is online iff `last_seen >= silent_since(...)` (a `last_seen` in the future, clock
    skew between replicas, counts as online); never seen is offline. A query can use it as is.

    ValueError for a tolerance below 1 or not finite, an interval that is not a finite
    positive number, or a naive `now`.
    """
    _require_aware(now, "now")
    check_tolerance(tolerance)
    return now - _allowance(heartbeat_interval_seconds, tolerance)
