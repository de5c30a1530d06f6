"""Device liveness: when a silent device counts as offline."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from twin.liveness import silent_since

NOW = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)
US = timedelta(microseconds=1)


def ago(seconds: float) -> datetime:
    return NOW - timedelta(seconds=seconds)


def is_online(last_seen: datetime | None, interval: float, tolerance: float, now: datetime) -> bool:
    """The rule as liveness_store applies it in SQL (`last_seen_at >= silent_since`)."""
    since = silent_since(interval, tolerance, now)
    return last_seen is not None and last_seen >= since


@pytest.mark.parametrize(
    ("last_seen", "interval", "tolerance", "online"),
    [
        (None, 60, 1.5, False),
        (NOW, 60, 1, True),
        (ago(59), 60, 1, True),
        (ago(60), 60, 1, True),
        (ago(60) - US, 60, 1, False),
        (ago(89), 60, 1.5, True),
        (ago(90), 60, 1.5, True),
        (ago(90) - US, 60, 1.5, False),
        (ago(3600), 60, 1.5, False),
        (ago(0.25), 0.1, 2, False),
        (ago(0.2), 0.1, 2, True),
        (ago(86_400), 86_400, 1, True),
        # Clock skew between replicas: a heartbeat "from the future" is a heartbeat.
        (NOW + timedelta(minutes=5), 60, 1, True),
        # The same instant in another zone.
        (datetime(2026, 11, 23, 11, 0, 30, tzinfo=timezone(timedelta(hours=1))), 20, 1.5, True),
        (datetime(2026, 11, 23, 10, 59, 29, tzinfo=timezone(timedelta(hours=1))), 20, 1.5, False),
    ],
)
def test_is_online(
    last_seen: datetime | None, interval: float, tolerance: float, online: bool
) -> None:
    assert is_online(last_seen, interval, tolerance, NOW) is online


@pytest.mark.parametrize("tolerance", [0.999, 0, -1, float("nan"), float("inf")])
def test_bad_tolerance(tolerance: float) -> None:
    with pytest.raises(ValueError, match="tolerance"):
        silent_since(60, tolerance, NOW)


@pytest.mark.parametrize("interval", [0, -5, float("nan"), float("inf"), float("-inf")])
def test_bad_heartbeat_interval(interval: float) -> None:
    with pytest.raises(ValueError, match="heartbeat_interval_seconds"):
        silent_since(interval, 1.5, NOW)


def test_absurd_allowance() -> None:
    with pytest.raises(ValueError, match="too long"):
        silent_since(1e300, 1, NOW)


NAIVE = datetime(2026, 11, 23, 10, 0)


def test_naive_datetimes_are_refused() -> None:
    with pytest.raises(ValueError, match="aware"):
        silent_since(60, 1, NAIVE)
