"""Device liveness from heartbeats: who is online, who changed, and when to look again.

Pure logic, no I/O. A device is online while its last sign of life is at most
`heartbeat_interval * tolerance` old; the tolerance (>= 1) forgives a late or lost heartbeat.
The liveness loop feeds the registry's view of its devices to `liveness_transitions`, applies
the changes, and sleeps until `next_check_at`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

# The resolution of datetime: the first instant after a moment.
_TICK = timedelta(microseconds=1)


@dataclass(frozen=True)
class LivenessInput:
    """What the registry knows about one device: when it was last seen, how often it promises
    a heartbeat, and whether it is currently recorded as online."""

    device_id: str
    last_seen: datetime | None
    heartbeat_interval_seconds: float
    currently_online: bool


@dataclass(frozen=True)
class LivenessChange:
    """A device whose recorded liveness is wrong: it is now `online`, since `at`."""

    device_id: str
    online: bool
    at: datetime


def _require_aware(moment: datetime | None, name: str) -> None:
    if moment is not None and (moment.tzinfo is None or moment.utcoffset() is None):
        raise ValueError(f"{name} must be an aware datetime")


def _check_tolerance(tolerance: float) -> None:
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
        # One timedelta, shared by every function here, so they agree to the microsecond.
        return timedelta(seconds=heartbeat_interval_seconds * tolerance)
    except OverflowError:
        raise ValueError(
            f"heartbeat allowance {heartbeat_interval_seconds!r} s x {tolerance!r} is too long"
        ) from None


def is_online(
    last_seen: datetime | None,
    heartbeat_interval_seconds: float,
    tolerance: float,
    now: datetime,
) -> bool:
    """Whether a device last seen at `last_seen` (None: never) counts as online at `now`:
    `now - last_seen <= heartbeat_interval_seconds * tolerance`.

    A `last_seen` in the future (clock skew between replicas) counts as online. ValueError
    for a tolerance below 1 or not finite, an interval that is not a finite positive number,
    or a naive datetime.
    """
    _require_aware(last_seen, "last_seen")
    _require_aware(now, "now")
    _check_tolerance(tolerance)
    allowance = _allowance(heartbeat_interval_seconds, tolerance)
    return last_seen is not None and now - last_seen <= allowance


def liveness_transitions(
    devices: Iterable[LivenessInput], now: datetime, tolerance: float
) -> list[LivenessChange]:
    """The devices whose `currently_online` disagrees with `is_online` at `now`, in input order.

    A device going offline changes `at` the moment its allowance ran out (last_seen +
    interval * tolerance), or at `now` if it was never seen; one coming back changes at
    `last_seen` (at most `now`). These moments depend only on the inputs, not on when the loop
    happens to run, so a late loop or another replica reports the same change at the same time.
    """
    _require_aware(now, "now")
    _check_tolerance(tolerance)
    changes: list[LivenessChange] = []
    for device in devices:
        online = is_online(device.last_seen, device.heartbeat_interval_seconds, tolerance, now)
        if online == device.currently_online:
            continue
        if device.last_seen is None:
            at = now
        elif online:
            at = min(device.last_seen, now)
        else:
            at = device.last_seen + _allowance(device.heartbeat_interval_seconds, tolerance)
        changes.append(LivenessChange(device.device_id, online, at))
    return changes


def next_check_at(devices: Iterable[LivenessInput], tolerance: float) -> datetime | None:
    """The earliest moment a device recorded as online can turn offline; None if there is none.

    That is the first instant at which `is_online` is false for it, one microsecond after its
    allowance runs out: a loop that sleeps until exactly the end of the allowance would find
    the device still online and go back to sleep until the same moment, spinning. Devices
    recorded as offline are ignored (only a heartbeat, not time, brings them back), as are
    ones never seen (they are offline already and `liveness_transitions` reports them). The
    result may lie in the past, meaning "check now".
    """
    _check_tolerance(tolerance)
    earliest: datetime | None = None
    for device in devices:
        if not device.currently_online or device.last_seen is None:
            continue
        _require_aware(device.last_seen, "last_seen")
        due = device.last_seen + _allowance(device.heartbeat_interval_seconds, tolerance) + _TICK
        if earliest is None or due < earliest:
            earliest = due
    return earliest
