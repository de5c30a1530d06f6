"""How fast a campaign starts devices: concurrency, starts per minute and an exponential ramp.

Three limits, each optional, all of which must allow a start (`starts_allowed`):

* `max_concurrent`: devices in progress at once (downloading, installing, waiting for a
  retry). A slow or stuck device thus holds back the rollout instead of piling up work.
* `starts_per_minute`: starts within any rolling 60 seconds, counted from the timestamps of
  recent starts the driver keeps (floats in seconds, monotonic or epoch, as long as `now` is on
  the same clock). A rolling window rather than per-minute buckets, so no burst of twice the
  rate straddles a minute boundary.
* an exponential ramp after AWS IoT Jobs' `exponentialRate`: the rate starts at
  `ramp_base_per_minute` and is multiplied by `ramp_factor` each time another
  `ramp_every_succeeded` devices have succeeded (base × factor^⌊succeeded / every⌋), capped by
  `starts_per_minute` when that is set. The campaign speeds up only as it proves itself:
  failures do not increase the rate.

A rate applies as whole starts per rolling minute (its integer part: 2.25/min allows 2), which
is why rates below 1/min are refused. No limit at all means any number of starts, given as
`UNLIMITED` (the driver takes the smaller of that and the devices it has waiting).

Everything here is pure; the driver keeps the start timestamps and the counts.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from twin.errors import InvalidArgument

__all__ = [
    "UNLIMITED",
    "WINDOW_SECONDS",
    "RateLimits",
    "check_rate_limits",
    "current_rate",
    "next_start_at",
    "starts_allowed",
]

WINDOW_SECONDS = 60.0
# `starts_allowed` when nothing limits the starts.
UNLIMITED = sys.maxsize
_MIN_RATE = 1.0


@dataclass(frozen=True, slots=True)
class RateLimits:
    """Limits on starting devices; None leaves a limit off (see the module docstring).

    The ramp is on when `ramp_base_per_minute` is set, and then needs `ramp_factor` (> 1) and
    `ramp_every_succeeded` (>= 1) too; `check_rate_limits` enforces the rules.
    """

    max_concurrent: int | None = None
    starts_per_minute: int | None = None
    ramp_base_per_minute: float | None = None
    ramp_factor: float | None = None
    ramp_every_succeeded: int | None = None


def _is_positive_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def check_rate_limits(limits: RateLimits) -> None:
    """Raise InvalidArgument, naming the field, unless `limits` makes sense.

    `max_concurrent`, `starts_per_minute` and `ramp_every_succeeded` are integers >= 1 when
    set. The ramp fields are set all together or not at all; `ramp_base_per_minute` is >= 1
    (and at most `starts_per_minute`, if set), `ramp_factor` a finite number > 1.
    """
    for name in ("max_concurrent", "starts_per_minute", "ramp_every_succeeded"):
        value = getattr(limits, name)
        if value is not None and not _is_positive_count(value):
            raise InvalidArgument(f"rate_limits.{name}: must be an integer >= 1, got {value!r}")
    base, factor, every = (
        limits.ramp_base_per_minute,
        limits.ramp_factor,
        limits.ramp_every_succeeded,
    )
    if base is None and factor is None and every is None:
        return
    if base is None or factor is None or every is None:
        raise InvalidArgument(
            "rate_limits: set ramp_base_per_minute, ramp_factor and ramp_every_succeeded "
            "together, or none of them"
        )
    # Written so that NaN fails the checks.
    if not _MIN_RATE <= base < math.inf:
        raise InvalidArgument(
            f"rate_limits.ramp_base_per_minute: must be a number >= {_MIN_RATE:g}, got {base!r}"
        )
    if limits.starts_per_minute is not None and base > limits.starts_per_minute:
        raise InvalidArgument(
            f"rate_limits.ramp_base_per_minute: {base:g} exceeds starts_per_minute "
            f"{limits.starts_per_minute}, the ramp's ceiling"
        )
    if not 1 < factor < math.inf:
        raise InvalidArgument(
            f"rate_limits.ramp_factor: must be a finite number > 1, got {factor!r}"
        )


def current_rate(limits: RateLimits, succeeded: int) -> float | None:
    """The allowed starts per minute after `succeeded` devices succeeded; None: unlimited.

    Without a ramp, `starts_per_minute`. With one, base × factor^⌊succeeded / every⌋, capped
    by `starts_per_minute`; an uncapped ramp that outgrows every float is unlimited. Raises
    InvalidArgument for limits `check_rate_limits` refuses.
    """
    check_rate_limits(limits)
    ceiling = limits.starts_per_minute
    base, factor, every = (
        limits.ramp_base_per_minute,
        limits.ramp_factor,
        limits.ramp_every_succeeded,
    )
    if base is None or factor is None or every is None:
        return None if ceiling is None else float(ceiling)
    steps = succeeded // every
    # Once at the ceiling the exact power no longer matters (and could overflow).
    if ceiling is not None and steps * math.log(factor) >= math.log(ceiling / base):
        return float(ceiling)
    try:
        # float() as well: integral base and factor give an exact integer power.
        return float(base * factor**steps)
    except OverflowError:
        return None


def _window(recent_starts: Sequence[float], now: float) -> list[float]:
    """The starts that count against the rate at `now`, oldest first.

    A start counts for `WINDOW_SECONDS` after it happened; one stamped after `now` (a clock
    step) counts too, erring on the slow side.
    """
    return sorted(start for start in recent_starts if start > now - WINDOW_SECONDS)


def starts_allowed(
    limits: RateLimits,
    *,
    in_progress: int,
    recent_starts: Sequence[float],
    now: float,
    succeeded: int,
) -> int:
    """How many devices may be started at `now`: 0 or more, `UNLIMITED` if nothing limits.

    `in_progress` devices are updating; `recent_starts` are the times of earlier starts (older
    ones than `WINDOW_SECONDS` are ignored, so passing more history is harmless); `succeeded`
    drives the ramp. Raises InvalidArgument for limits `check_rate_limits` refuses.
    """
    allowed = UNLIMITED
    if limits.max_concurrent is not None:
        allowed = max(0, limits.max_concurrent - in_progress)
    rate = current_rate(limits, succeeded)
    if rate is not None:
        per_window = math.floor(rate)
        allowed = min(allowed, max(0, per_window - len(_window(recent_starts, now))))
    return allowed


def next_start_at(
    limits: RateLimits,
    *,
    in_progress: int,
    recent_starts: Sequence[float],
    now: float,
    succeeded: int,
) -> float | None:
    """When the next start becomes possible, on the clock of `now` and `recent_starts`.

    `now` when `starts_allowed` is above 0. None when the concurrency limit is reached: only
    a device finishing frees a place, so the driver waits for that rather than a time. Else
    the moment enough recent starts have left the rolling window, assuming `succeeded` does
    not change meanwhile (a success can only raise the rate, so asking again then is safe).
    Raises InvalidArgument for limits `check_rate_limits` refuses.
    """
    if limits.max_concurrent is not None and in_progress >= limits.max_concurrent:
        return None
    rate = current_rate(limits, succeeded)
    if rate is None:
        return now
    window = _window(recent_starts, now)
    # Starting is possible again once the oldest `excess + 1` starts have aged out; the
    # rate is at least 1/min, so that start is in the window.
    excess = len(window) - math.floor(rate)
    if excess < 0:
        return now
    return window[excess] + WINDOW_SECONDS
