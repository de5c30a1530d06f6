"""Rollout rates: concurrency, starts per rolling minute, the exponential ramp."""

from __future__ import annotations

import random

import pytest

from firmware_ota.rollout_rates import (
    UNLIMITED,
    WINDOW_SECONDS,
    RateLimits,
    check_rate_limits,
    current_rate,
    next_start_at,
    starts_allowed,
)
from twin.errors import InvalidArgument

NOW = 10_000.0
RAMP = RateLimits(
    starts_per_minute=100, ramp_base_per_minute=5, ramp_factor=2, ramp_every_succeeded=10
)
# 1/min, 1.5/min, 2.25/min, ... uncapped.
SLOW_RAMP = RateLimits(ramp_base_per_minute=1, ramp_factor=1.5, ramp_every_succeeded=1)


@pytest.mark.parametrize(
    "limits",
    [
        RateLimits(),
        RateLimits(max_concurrent=1, starts_per_minute=1),
        RAMP,
        RateLimits(ramp_base_per_minute=1.5, ramp_factor=1.01, ramp_every_succeeded=1),
        RateLimits(
            starts_per_minute=5, ramp_base_per_minute=5, ramp_factor=3, ramp_every_succeeded=1
        ),
    ],
)
def test_check_rate_limits_accepts(limits: RateLimits) -> None:
    check_rate_limits(limits)


@pytest.mark.parametrize(
    ("limits", "message"),
    [
        (RateLimits(max_concurrent=0), r"rate_limits\.max_concurrent: must be an integer >= 1"),
        (RateLimits(max_concurrent=-3), r"max_concurrent"),
        (RateLimits(max_concurrent=2.5), r"max_concurrent"),  # type: ignore[arg-type]
        (RateLimits(max_concurrent=True), r"max_concurrent"),
        (RateLimits(starts_per_minute=0), r"rate_limits\.starts_per_minute"),
        (RateLimits(ramp_base_per_minute=5), r"together, or none of them"),
        (RateLimits(ramp_factor=2, ramp_every_succeeded=10), r"together"),
        (
            RateLimits(ramp_base_per_minute=0.5, ramp_factor=2, ramp_every_succeeded=1),
            r"rate_limits\.ramp_base_per_minute: must be a number >= 1",
        ),
        (
            RateLimits(ramp_base_per_minute=float("nan"), ramp_factor=2, ramp_every_succeeded=1),
            r"ramp_base_per_minute",
        ),
        (
            RateLimits(ramp_base_per_minute=float("inf"), ramp_factor=2, ramp_every_succeeded=1),
            r"ramp_base_per_minute",
        ),
        (
            RateLimits(
                starts_per_minute=10, ramp_base_per_minute=20, ramp_factor=2, ramp_every_succeeded=1
            ),
            r"ramp_base_per_minute: 20 exceeds starts_per_minute 10",
        ),
        (
            RateLimits(ramp_base_per_minute=5, ramp_factor=1, ramp_every_succeeded=1),
            r"rate_limits\.ramp_factor: must be a finite number > 1",
        ),
        (
            RateLimits(ramp_base_per_minute=5, ramp_factor=float("inf"), ramp_every_succeeded=1),
            r"ramp_factor",
        ),
        (
            RateLimits(ramp_base_per_minute=5, ramp_factor=float("nan"), ramp_every_succeeded=1),
            r"ramp_factor",
        ),
        (
            RateLimits(ramp_base_per_minute=5, ramp_factor=2, ramp_every_succeeded=0),
            r"rate_limits\.ramp_every_succeeded",
        ),
    ],
)
def test_check_rate_limits_rejects(limits: RateLimits, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        check_rate_limits(limits)


@pytest.mark.parametrize(
    ("limits", "succeeded", "rate"),
    [
        (RateLimits(), 0, None),
        (RateLimits(max_concurrent=5), 1000, None),
        (RateLimits(starts_per_minute=30), 0, 30.0),
        (RAMP, 0, 5.0),
        (RAMP, 9, 5.0),
        (RAMP, 10, 10.0),
        (RAMP, 29, 20.0),
        (RAMP, 30, 40.0),
        (RAMP, 40, 80.0),
        (RAMP, 50, 100.0),  # capped: 160 > 100
        (RAMP, 10**9, 100.0),  # far past the cap: no overflow
        (RateLimits(ramp_base_per_minute=1, ramp_factor=1.5, ramp_every_succeeded=1), 2, 2.25),
        # An uncapped ramp grows without bound, and beyond any float it is unlimited.
        (RateLimits(ramp_base_per_minute=1, ramp_factor=2, ramp_every_succeeded=1), 100, 2.0**100),
        (RateLimits(ramp_base_per_minute=1, ramp_factor=2.0, ramp_every_succeeded=1), 5000, None),
        (RateLimits(ramp_base_per_minute=1, ramp_factor=2, ramp_every_succeeded=1), 5000, None),
    ],
)
def test_current_rate(limits: RateLimits, succeeded: int, rate: float | None) -> None:
    assert current_rate(limits, succeeded) == rate


def test_current_rate_checks_the_limits() -> None:
    with pytest.raises(InvalidArgument):
        current_rate(RateLimits(ramp_factor=2), 0)


def test_unlimited() -> None:
    assert (
        starts_allowed(
            RateLimits(), in_progress=10**6, recent_starts=[NOW] * 1000, now=NOW, succeeded=0
        )
        == UNLIMITED
    )
    assert (
        next_start_at(RateLimits(), in_progress=10**6, recent_starts=[NOW], now=NOW, succeeded=0)
        == NOW
    )


# (limits, in_progress, recent start ages in seconds, succeeded, allowed, next start - NOW)
CASES: list[tuple[RateLimits, int, list[float], int, int, float | None]] = [
    # Concurrency only.
    (RateLimits(max_concurrent=10), 0, [], 0, 10, 0.0),
    (RateLimits(max_concurrent=10), 7, [], 0, 3, 0.0),
    (RateLimits(max_concurrent=10), 10, [], 0, 0, None),
    (RateLimits(max_concurrent=10), 12, [], 0, 0, None),
    # Starts per rolling minute.
    (RateLimits(starts_per_minute=3), 0, [], 0, 3, 0.0),
    (RateLimits(starts_per_minute=3), 0, [5], 0, 2, 0.0),
    (RateLimits(starts_per_minute=3), 0, [50, 20, 5], 0, 0, 10.0),  # the oldest leaves first
    (RateLimits(starts_per_minute=3), 0, [59.9, 20, 5], 0, 0, 0.1),
    (RateLimits(starts_per_minute=3), 0, [60, 20, 5], 0, 1, 0.0),  # 60 s old: out of window
    (RateLimits(starts_per_minute=3), 0, [600, 3600, 20], 0, 2, 0.0),  # old history ignored
    (RateLimits(starts_per_minute=2), 0, [50, 40, 30, 20], 0, 0, 30.0),  # over the limit
    (RateLimits(starts_per_minute=2), 0, [50, 50, 50], 0, 0, 10.0),
    (RateLimits(starts_per_minute=1), 0, [-5], 0, 0, 65.0),  # stamped after now: counts
    # Both: the tighter limit wins.
    (RateLimits(max_concurrent=2, starts_per_minute=10), 0, [], 0, 2, 0.0),
    (RateLimits(max_concurrent=20, starts_per_minute=10), 0, [30] * 4, 0, 6, 0.0),
    (RateLimits(max_concurrent=5, starts_per_minute=3), 5, [30, 20, 10], 0, 0, None),
    (RateLimits(max_concurrent=5, starts_per_minute=3), 4, [30, 20, 10], 0, 0, 30.0),
    # The ramp: 5/min, then 10/min after 10 successes.
    (RAMP, 0, [10] * 5, 0, 0, 50.0),
    (RAMP, 0, [10] * 5, 10, 5, 0.0),
    # Whole starts per minute: 1.5/min allows one, 2.25/min two.
    (SLOW_RAMP, 0, [1], 1, 0, 59.0),
    (SLOW_RAMP, 0, [1], 2, 1, 0.0),
]  # fmt: skip


@pytest.mark.parametrize(
    ("limits", "in_progress", "ages", "succeeded", "allowed", "next_in"), CASES
)
def test_starts_allowed_and_next_start_at(
    limits: RateLimits,
    in_progress: int,
    ages: list[float],
    succeeded: int,
    allowed: int,
    next_in: float | None,
) -> None:
    recent = [NOW - age for age in ages]
    args = {"in_progress": in_progress, "recent_starts": recent, "now": NOW, "succeeded": succeeded}
    assert starts_allowed(limits, **args) == allowed  # type: ignore[arg-type]
    expected = None if next_in is None else NOW + next_in
    assert next_start_at(limits, **args) == pytest.approx(expected)  # type: ignore[arg-type]


def test_a_simulated_rollout_never_exceeds_the_limits() -> None:
    """Start devices whenever allowed, sleeping until next_start_at; check every window."""
    limits = RateLimits(
        max_concurrent=25,
        starts_per_minute=40,
        ramp_base_per_minute=4,
        ramp_factor=1.5,
        ramp_every_succeeded=8,
    )
    rng = random.Random(1)
    now, succeeded = 0.0, 0
    starts: list[float] = []
    running: list[float] = []  # finish times
    while len(starts) < 2000:
        done = [t for t in running if t <= now]
        succeeded += len(done)
        running = [t for t in running if t > now]
        allowed = starts_allowed(
            limits,
            in_progress=len(running),
            recent_starts=starts[-100:],
            now=now,
            succeeded=succeeded,
        )
        rate = current_rate(limits, succeeded)
        assert rate is not None
        for _ in range(min(allowed, 5)):
            starts.append(now)
            running.append(now + rng.uniform(5, 200))
        in_window = [t for t in starts if t > now - WINDOW_SECONDS]
        assert len(in_window) <= int(rate)
        assert len(running) <= 25
        wake = next_start_at(
            limits,
            in_progress=len(running),
            recent_starts=starts[-100:],
            now=now,
            succeeded=succeeded,
        )
        assert wake is None or wake >= now
        # Sleep until the next start is possible or the next device finishes.
        candidates = [t for t in (wake, min(running, default=None)) if t is not None and t > now]
        now = min(candidates) if candidates else now + 1
    # The ramp reached its ceiling, so the starts took far less time than at the base rate.
    assert current_rate(limits, succeeded) == 40
    assert starts[-1] < 60 * 2000 / 4
