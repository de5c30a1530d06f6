"""Device liveness: online from heartbeats, transitions, and when the loop must look again."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone

import pytest

from twin.liveness import (
    LivenessChange,
    LivenessInput,
    is_online,
    liveness_transitions,
    next_check_at,
)

NOW = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)
US = timedelta(microseconds=1)


def ago(seconds: float) -> datetime:
    return NOW - timedelta(seconds=seconds)


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
        is_online(NOW, 60, tolerance, NOW)
    with pytest.raises(ValueError, match="tolerance"):
        liveness_transitions([], NOW, tolerance)
    with pytest.raises(ValueError, match="tolerance"):
        next_check_at([], tolerance)


@pytest.mark.parametrize("interval", [0, -5, float("nan"), float("inf"), float("-inf")])
def test_bad_heartbeat_interval(interval: float) -> None:
    device = LivenessInput("lamp-1", ago(1), interval, currently_online=True)
    with pytest.raises(ValueError, match="heartbeat_interval_seconds"):
        is_online(ago(1), interval, 1.5, NOW)
    with pytest.raises(ValueError, match="heartbeat_interval_seconds"):
        liveness_transitions([device], NOW, 1.5)
    with pytest.raises(ValueError, match="heartbeat_interval_seconds"):
        next_check_at([device], 1.5)


def test_absurd_allowance() -> None:
    with pytest.raises(ValueError, match="too long"):
        is_online(NOW, 1e300, 1, NOW)


NAIVE = datetime(2026, 11, 23, 10, 0)


@pytest.mark.parametrize(
    "call",
    [
        lambda: is_online(NAIVE, 60, 1, NOW),
        lambda: is_online(NOW, 60, 1, NAIVE),
        lambda: is_online(None, 60, 1, NAIVE),
        lambda: liveness_transitions([], NAIVE, 1),
        lambda: liveness_transitions([LivenessInput("a", NAIVE, 60, True)], NOW, 1),
        lambda: next_check_at([LivenessInput("a", NAIVE, 60, True)], 1),
    ],
)
def test_naive_datetimes_are_refused(call: Callable[[], object]) -> None:
    with pytest.raises(ValueError, match="aware"):
        call()


# Every device beats every 60 s; the tolerance is 1.5, so 90 s of silence are allowed.
@pytest.mark.parametrize(
    ("last_seen", "currently_online", "change"),
    [
        (ago(10), True, None),
        (ago(90), True, None),
        (ago(3600), False, None),
        (None, False, None),
        (ago(91), True, LivenessChange("d", False, ago(1))),
        (ago(90) - US, True, LivenessChange("d", False, NOW - US)),
        # Went silent long ago (say the loop was not running): the change is dated when the
        # allowance ran out, not when the loop noticed.
        (ago(3600), True, LivenessChange("d", False, ago(3600 - 90))),
        (None, True, LivenessChange("d", False, NOW)),
        (ago(5), False, LivenessChange("d", True, ago(5))),
        (ago(90), False, LivenessChange("d", True, ago(90))),
        (NOW + timedelta(seconds=3), False, LivenessChange("d", True, NOW)),
    ],
)
def test_liveness_transition_of_one_device(
    last_seen: datetime | None, currently_online: bool, change: LivenessChange | None
) -> None:
    device = LivenessInput("d", last_seen, 60, currently_online)
    assert liveness_transitions([device], NOW, 1.5) == ([change] if change else [])


def test_liveness_transitions_of_a_fleet() -> None:
    devices = [
        LivenessInput("lamp-1", ago(30), 60, True),  # fine
        LivenessInput("lamp-2", ago(200), 60, True),  # silent too long
        LivenessInput("sensor-1", ago(400), 300, True),  # slower heartbeat: still fine
        LivenessInput("sensor-2", ago(10), 300, False),  # came back
        LivenessInput("camera-1", None, 30, True),  # never seen
        LivenessInput("camera-2", ago(1000), 30, False),  # still gone
    ]
    changes = liveness_transitions(iter(devices), NOW, 1.5)
    assert changes == [
        LivenessChange("lamp-2", False, ago(200 - 90)),
        LivenessChange("sensor-2", True, ago(10)),
        LivenessChange("camera-1", False, NOW),
    ]


def test_liveness_transitions_are_idempotent_once_applied() -> None:
    devices = [
        LivenessInput("a", ago(500), 60, True),
        LivenessInput("b", ago(1), 60, False),
    ]
    changes = liveness_transitions(devices, NOW, 2)
    by_id = {c.device_id: c.online for c in changes}
    applied = [
        LivenessInput(d.device_id, d.last_seen, d.heartbeat_interval_seconds, by_id[d.device_id])
        for d in devices
    ]
    assert liveness_transitions(applied, NOW, 2) == []
    assert liveness_transitions([], NOW, 2) == []


@pytest.mark.parametrize(
    ("devices", "expected"),
    [
        ([], None),
        ([LivenessInput("a", ago(10), 60, False)], None),
        ([LivenessInput("a", None, 60, True)], None),
        ([LivenessInput("a", ago(10), 60, True)], ago(10) + timedelta(seconds=90) + US),
        (
            [
                LivenessInput("slow", ago(10), 600, True),
                LivenessInput("fast", ago(50), 60, True),
                LivenessInput("offline", ago(1000), 1, False),
                LivenessInput("later", ago(5), 60, True),
            ],
            ago(50) + timedelta(seconds=90) + US,
        ),
        # Overdue: the answer lies in the past, meaning "check now".
        ([LivenessInput("a", ago(1000), 60, True)], ago(1000) + timedelta(seconds=90) + US),
    ],
)
def test_next_check_at(devices: list[LivenessInput], expected: datetime | None) -> None:
    assert next_check_at(devices, 1.5) == expected
    assert next_check_at(iter(devices), 1.5) == expected


@pytest.mark.parametrize(
    ("interval", "tolerance"), [(60, 1), (60, 1.5), (0.1, 3), (7.3, 1.1), (86_400, 2)]
)
def test_next_check_at_is_the_first_offline_instant(interval: float, tolerance: float) -> None:
    last_seen = ago(interval / 3)
    device = LivenessInput("a", last_seen, interval, True)
    due = next_check_at([device], tolerance)
    assert due is not None
    assert is_online(last_seen, interval, tolerance, due - US)
    assert not is_online(last_seen, interval, tolerance, due)
    assert liveness_transitions([device], due - US, tolerance) == []
    [change] = liveness_transitions([device], due, tolerance)
    assert not change.online and change.at <= due


def test_a_loop_sleeping_until_next_check_never_spins() -> None:
    """Simulate the liveness loop: each wake-up must find at least one device gone offline."""
    devices = {f"d{i}": LivenessInput(f"d{i}", ago(i * 7), 10 + i * 5, True) for i in range(1, 20)}
    clock = NOW
    wakeups = 0
    while (due := next_check_at(devices.values(), 1.5)) is not None:
        clock = max(clock, due)
        changes = liveness_transitions(devices.values(), clock, 1.5)
        assert changes, f"woke at {clock} for nothing"
        for change in changes:
            old = devices[change.device_id]
            devices[change.device_id] = LivenessInput(
                old.device_id, old.last_seen, old.heartbeat_interval_seconds, change.online
            )
        wakeups += 1
        assert wakeups <= len(devices)
    assert not any(d.currently_online for d in devices.values())
