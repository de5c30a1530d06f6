"""Reconciliation: device acknowledgements, sync status, push backoff, coalesced deltas."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from twin.delta import compute_delta
from twin.errors import InvalidArgument
from twin.merge_patch import Document, apply_merge_patch
from twin.reconciliation import (
    Acknowledgement,
    AckStatus,
    InvalidAcknowledgement,
    PropertyAck,
    SyncState,
    SyncStatus,
    next_push_due,
    next_sync_status,
    record_push,
    split_acknowledgement,
    status_from_json,
    status_to_json,
)

T0 = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)
T1 = T0 + timedelta(minutes=1)
NOW = T0 + timedelta(minutes=5)
DELTA: Document = {"brightness": 80}
STATUSES = "applied, in-progress, rejected"

# --- split_acknowledgement -------------------------------------------------------------------


def test_report_without_ack() -> None:
    report: dict[str, Any] = {"brightness": 80, "energy": {"power_w": 41.5}}
    before = copy.deepcopy(report)
    patch, ack = split_acknowledgement(report)
    assert ack is None
    assert patch == before
    assert patch is not report
    assert report == before


def test_full_ack_is_split_off() -> None:
    report: dict[str, Any] = {
        "brightness": 60,
        "$ack": {
            "version": 7,
            "status": "rejected",
            "reason": "partly refused",
            "properties": {
                "brightness": {"status": "rejected", "reason": "above driver limit"},
                "dimming_schedule": {"status": "applied"},
                "energy.power_w": {"status": "in-progress"},
            },
        },
    }
    before = copy.deepcopy(report)
    patch, ack = split_acknowledgement(report)
    assert report == before, "the report must not be mutated"
    assert patch == {"brightness": 60}
    assert ack == Acknowledgement(
        version=7,
        status=AckStatus.REJECTED,
        reason="partly refused",
        properties={
            "brightness": PropertyAck(AckStatus.REJECTED, "above driver limit"),
            "dimming_schedule": PropertyAck(AckStatus.APPLIED),
            "energy.power_w": PropertyAck(AckStatus.IN_PROGRESS),
        },
    )
    assert ack.rejects


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (
            {"version": 0, "status": "applied"},
            Acknowledgement(version=0, status=AckStatus.APPLIED),
        ),
        (
            {"version": 3, "status": "in-progress", "reason": None, "properties": None},
            Acknowledgement(version=3, status=AckStatus.IN_PROGRESS),
        ),
        # protobuf's Struct carries every number as a double.
        ({"version": 7.0, "status": "applied"}, Acknowledgement(7, AckStatus.APPLIED)),
        (
            {"version": 2**63 - 1, "status": "applied"},
            Acknowledgement(2**63 - 1, AckStatus.APPLIED),
        ),
        (
            {"version": 1, "status": "applied", "reason": "r" * 256, "properties": {}},
            Acknowledgement(1, AckStatus.APPLIED, "r" * 256),
        ),
        (
            {"version": 1, "status": "applied", "properties": {"a": {"status": "applied"}}},
            Acknowledgement(1, AckStatus.APPLIED, properties={"a": PropertyAck(AckStatus.APPLIED)}),
        ),
    ],
)
def test_valid_acks(raw: dict[str, Any], expected: Acknowledgement) -> None:
    patch, ack = split_acknowledgement({"$ack": raw})
    assert patch == {}
    assert ack == expected
    assert isinstance(ack.status, AckStatus)
    assert isinstance(ack.version, int) and not isinstance(ack.version, bool)


@pytest.mark.parametrize(
    "key",
    [
        "brightness",
        "energy.power_w",
        "a.b.c",
        "$weird-but legal key",
        "k" * 128,
        ".".join(["s"] * 16),
        ".".join(["k" * 128] * 3),
    ],
)
def test_valid_property_paths(key: str) -> None:
    _, ack = split_acknowledgement(
        {"$ack": {"version": 1, "status": "applied", "properties": {key: {"status": "applied"}}}}
    )
    assert ack is not None and list(ack.properties) == [key]


def test_sixty_four_properties_are_allowed() -> None:
    properties = {f"p{i}": {"status": "applied"} for i in range(64)}
    _, ack = split_acknowledgement(
        {"$ack": {"version": 1, "status": "applied", "properties": properties}}
    )
    assert ack is not None and len(ack.properties) == 64


def _ok(**changes: Any) -> dict[str, Any]:
    ack: dict[str, Any] = {"version": 7, "status": "applied"}
    ack.update(changes)
    return ack


def _prop(item: Any, key: str = "x") -> dict[str, Any]:
    return _ok(properties={key: item})


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (None, "$ack: must be an object"),
        ([], "$ack: must be an object"),
        ("applied", "$ack: must be an object"),
        ({}, "$ack.status: is required"),
        ({"status": "applied"}, "$ack.version: is required"),
        ({"version": 7}, "$ack.status: is required"),
        (_ok(extra=1), "$ack: unknown member 'extra'"),
        (_ok(Version=7), "$ack: unknown member 'Version'"),
        (_ok(version="7"), "$ack.version: must be an integer"),
        (_ok(version=True), "$ack.version: must be an integer"),
        (_ok(version=7.5), "$ack.version: must be an integer"),
        (_ok(version=float("nan")), "$ack.version: must be an integer"),
        (_ok(version=float("inf")), "$ack.version: must be an integer"),
        (_ok(version=None), "$ack.version: must be an integer"),
        (_ok(version=-1), "$ack.version: must be between 0 and"),
        (_ok(version=2**63), "$ack.version: must be between 0 and"),
        (_ok(status="done"), f"$ack.status: must be one of {STATUSES}"),
        (_ok(status="APPLIED"), f"$ack.status: must be one of {STATUSES}"),
        (_ok(status="in_progress"), f"$ack.status: must be one of {STATUSES}"),
        (_ok(status=1), f"$ack.status: must be one of {STATUSES}"),
        (_ok(status=None), f"$ack.status: must be one of {STATUSES}"),
        (_ok(reason=5), "$ack.reason: must be a string"),
        (_ok(reason=["x"]), "$ack.reason: must be a string"),
        (_ok(reason="r" * 257), "$ack.reason: is 257 characters long; the limit is 256"),
        (_ok(properties=[]), "$ack.properties: must be an object"),
        (_ok(properties="brightness"), "$ack.properties: must be an object"),
        (
            _ok(properties={f"p{i}": {"status": "applied"} for i in range(65)}),
            "$ack.properties: has 65 members; the limit is 64",
        ),
        (_prop("applied"), "$ack.properties.x: must be an object"),
        (_prop(None), "$ack.properties.x: must be an object"),
        (_prop({}), "$ack.properties.x.status: is required"),
        (_prop({"reason": "no"}), "$ack.properties.x.status: is required"),
        (_prop({"status": "nope"}), f"$ack.properties.x.status: must be one of {STATUSES}"),
        (
            _prop({"status": "nope"}, "energy.power_w"),
            f"$ack.properties.energy.power_w.status: must be one of {STATUSES}",
        ),
        (_prop({"status": "rejected", "reason": 3}), "$ack.properties.x.reason: must be a string"),
        (
            _prop({"status": "rejected", "reason": "r" * 257}),
            "$ack.properties.x.reason: is 257 characters long",
        ),
        (
            _prop({"status": "applied", "version": 7}),
            "$ack.properties.x: unknown member 'version'",
        ),
        (_prop({"status": "applied"}, ""), "$ack.properties: key '' is not a property path"),
        (_prop({"status": "applied"}, "a..b"), "$ack.properties: key 'a..b' is not a dotted"),
        (_prop({"status": "applied"}, ".a"), "$ack.properties: key '.a' is not a dotted"),
        (_prop({"status": "applied"}, "a."), "$ack.properties: key 'a.' is not a dotted"),
        (_prop({"status": "applied"}, "a[0]"), "$ack.properties: key 'a[0]' is not a dotted"),
        (_prop({"status": "applied"}, "a[]"), "$ack.properties: key 'a[]' is not a dotted"),
        (_prop({"status": "applied"}, "k" * 129), "is not a dotted property path"),
        (
            _prop({"status": "applied"}, ".".join(["s"] * 17)),
            "has 17 segments; the limit is 16",
        ),
        ({"version": 7, "status": "applied", "properties": {1: {"status": "applied"}}}, "key 1"),
    ],
)
def test_invalid_acks(raw: object, message: str) -> None:
    report = {"brightness": 1, "$ack": raw}
    with pytest.raises(InvalidArgument) as caught:
        split_acknowledgement(report)
    assert message in str(caught.value)
    assert isinstance(caught.value, InvalidAcknowledgement)
    assert str(caught.value).startswith(f"{caught.value.path}: ")
    assert caught.value.path.startswith("$ack")


@pytest.mark.parametrize("report", [None, [], "x", 1])
def test_report_must_be_an_object(report: Any) -> None:
    with pytest.raises(InvalidArgument, match="report must be a JSON object"):
        split_acknowledgement(report)


def test_only_the_top_level_ack_is_reserved() -> None:
    report: dict[str, Any] = {"nested": {"$ack": {"version": "not checked"}}}
    patch, ack = split_acknowledgement(report)
    assert ack is None
    assert patch == report


def test_acknowledgement_is_immutable() -> None:
    source = {"a": PropertyAck(AckStatus.APPLIED)}
    ack = Acknowledgement(1, AckStatus.APPLIED, properties=source)
    source["b"] = PropertyAck(AckStatus.REJECTED)
    assert list(ack.properties) == ["a"], "the ack must not alias the caller's dict"
    with pytest.raises(TypeError):
        ack.properties["c"] = PropertyAck(AckStatus.APPLIED)  # type: ignore[index]
    with pytest.raises(AttributeError):
        ack.version = 2  # type: ignore[misc]


@pytest.mark.parametrize(
    ("ack", "rejects"),
    [
        (Acknowledgement(1, AckStatus.APPLIED), False),
        (Acknowledgement(1, AckStatus.IN_PROGRESS), False),
        (Acknowledgement(1, AckStatus.REJECTED), True),
        (
            Acknowledgement(1, AckStatus.APPLIED, properties={"a": PropertyAck(AckStatus.APPLIED)}),
            False,
        ),
        (
            Acknowledgement(
                1, AckStatus.APPLIED, properties={"a": PropertyAck(AckStatus.REJECTED)}
            ),
            True,
        ),
        (
            Acknowledgement(
                1, AckStatus.IN_PROGRESS, properties={"a": PropertyAck(AckStatus.REJECTED)}
            ),
            True,
        ),
    ],
)
def test_ack_rejects(ack: Acknowledgement, rejects: bool) -> None:
    assert ack.rejects is rejects


# --- next_sync_status ------------------------------------------------------------------------


def _status(state: SyncState, version: int = 3, **fields: Any) -> SyncStatus:
    fields.setdefault("since", T0)
    return SyncStatus(state=state, desired_version=version, **fields)


def _ack(version: int, status: AckStatus, reason: str = "", **props: AckStatus) -> Acknowledgement:
    properties = {
        path: PropertyAck(s, f"{path} refused" if s is AckStatus.REJECTED else "")
        for path, s in props.items()
    }
    return Acknowledgement(version, status, reason, properties)


YESTERDAY = T0 - timedelta(days=1)
REJECTED_V3 = _status(
    SyncState.REJECTED,
    pushed_at=T1,
    push_attempts=2,
    rejected_reason="driver limit",
    rejected_properties={"brightness": "above driver limit"},
    converged_at=YESTERDAY,
)
PENDING_V3 = _status(SyncState.PENDING, pushed_at=T1, push_attempts=2, converged_at=YESTERDAY)
IN_SYNC_V3 = _status(SyncState.IN_SYNC, converged_at=T0)


# Short names keep the table below readable; REFUSED is AckStatus.REJECTED (not SyncState's).
IN_SYNC, PENDING, STALE, REJECTED = (
    SyncState.IN_SYNC,
    SyncState.PENDING,
    SyncState.STALE,
    SyncState.REJECTED,
)
APPLIED, IN_PROGRESS, REFUSED = AckStatus.APPLIED, AckStatus.IN_PROGRESS, AckStatus.REJECTED


# Each case: previous status, delta, desired version, online, ack -> expected status.
# fmt: off
SYNC_CASES = {
    # A first status.
    "new, no delta":
        (None, {}, 3, True, None, _status(IN_SYNC, since=NOW, converged_at=NOW)),
    "new, no delta, offline":
        (None, {}, 3, False, None, _status(IN_SYNC, since=NOW, converged_at=NOW)),
    "new, delta, online":
        (None, DELTA, 3, True, None, _status(PENDING, since=NOW)),
    "new, delta, offline":
        (None, DELTA, 3, False, None, _status(STALE, since=NOW)),
    "new, rejected as a whole":
        (None, DELTA, 3, True, _ack(3, REFUSED, "busy"),
         _status(REJECTED, since=NOW, rejected_reason="busy")),
    "new, one property rejected":
        (None, {"brightness": 80, "mode": "eco"}, 3, True,
         _ack(3, APPLIED, brightness=REFUSED, mode=APPLIED),
         _status(REJECTED, since=NOW, rejected_properties={"brightness": "brightness refused"})),
    "rejection wins over offline":
        (None, DELTA, 3, False, _ack(3, REFUSED, "no"),
         _status(REJECTED, since=NOW, rejected_reason="no")),
    "ack for an older version":
        (None, DELTA, 3, True, _ack(2, REFUSED), _status(PENDING, since=NOW)),
    "ack for a newer version":
        (None, DELTA, 3, True, _ack(4, REFUSED), _status(PENDING, since=NOW)),
    "old rejection, offline":
        (None, DELTA, 3, False, _ack(2, REFUSED), _status(STALE, since=NOW)),
    "in-progress ack":
        (None, DELTA, 3, True, _ack(3, IN_PROGRESS), _status(PENDING, since=NOW)),
    "applied ack but a delta left":
        (None, DELTA, 3, False, _ack(3, APPLIED), _status(STALE, since=NOW)),
    "rejected but nothing left to do":
        (None, {}, 3, True, _ack(3, REFUSED), _status(IN_SYNC, since=NOW, converged_at=NOW)),
    # From PENDING.
    "pending stays pending":
        (PENDING_V3, DELTA, 3, True, None, PENDING_V3),
    "pending goes stale, pushes kept":
        (PENDING_V3, DELTA, 3, False, None,
         _status(STALE, since=NOW, pushed_at=T1, push_attempts=2, converged_at=YESTERDAY)),
    "a new desired version resets pushes, since kept":
        (PENDING_V3, DELTA, 4, True, None, _status(PENDING, 4, converged_at=YESTERDAY)),
    "pending converges":
        (PENDING_V3, {}, 3, True, _ack(3, APPLIED),
         _status(IN_SYNC, since=NOW, pushed_at=T1, push_attempts=2, converged_at=NOW)),
    "pending rejected":
        (PENDING_V3, DELTA, 3, True, _ack(3, REFUSED, "no"),
         _status(REJECTED, since=NOW, pushed_at=T1, push_attempts=2, rejected_reason="no",
                 converged_at=YESTERDAY)),
    # From STALE.
    "stale comes back online":
        (_status(STALE, pushed_at=T1, push_attempts=1), DELTA, 3, True, None,
         _status(PENDING, since=NOW, pushed_at=T1, push_attempts=1)),
    "stale stays stale":
        (_status(STALE), DELTA, 3, False, None, _status(STALE)),
    # From IN_SYNC.
    "in sync stays in sync":
        (IN_SYNC_V3, {}, 3, True, None, IN_SYNC_V3),
    "in sync stays in sync offline":
        (IN_SYNC_V3, {}, 3, False, None, IN_SYNC_V3),
    "a new version with nothing to do stays in sync":
        (IN_SYNC_V3, {}, 4, True, None, _status(IN_SYNC, 4, converged_at=T0)),
    "drift: converged_at remembers the last convergence":
        (IN_SYNC_V3, DELTA, 3, True, None, _status(PENDING, since=NOW, converged_at=T0)),
    "a new desired version while in sync, offline":
        (IN_SYNC_V3, DELTA, 4, False, None, _status(STALE, 4, since=NOW, converged_at=T0)),
    # From REJECTED.
    "a rejection is sticky for its version":
        (REJECTED_V3, DELTA, 3, True, None, REJECTED_V3),
    "a rejection is sticky offline":
        (REJECTED_V3, DELTA, 3, False, None, REJECTED_V3),
    "an ack for another version does not lift it":
        (REJECTED_V3, DELTA, 3, True, _ack(2, APPLIED), REJECTED_V3),
    "a new rejection replaces the reasons, since kept":
        (REJECTED_V3, DELTA, 3, True, _ack(3, REFUSED, "still no", mode=REFUSED),
         _status(REJECTED, pushed_at=T1, push_attempts=2, rejected_reason="still no",
                 rejected_properties={"mode": "mode refused"}, converged_at=YESTERDAY)),
    "the device tries again for the same version":
        (REJECTED_V3, DELTA, 3, True, _ack(3, IN_PROGRESS),
         _status(PENDING, since=NOW, pushed_at=T1, push_attempts=2, converged_at=YESTERDAY)),
    "a new desired version makes the device try again":
        (REJECTED_V3, DELTA, 4, True, None,
         _status(PENDING, 4, since=NOW, converged_at=YESTERDAY)),
    "a new desired version, offline, old ack repeated":
        (REJECTED_V3, DELTA, 4, False, _ack(3, REFUSED),
         _status(STALE, 4, since=NOW, converged_at=YESTERDAY)),
    "a new desired version rejected at once":
        (REJECTED_V3, DELTA, 4, True, _ack(4, REFUSED, "again"),
         _status(REJECTED, 4, rejected_reason="again", converged_at=YESTERDAY)),
    "the operator backs off: in sync, reasons cleared":
        (REJECTED_V3, {}, 4, True, None, _status(IN_SYNC, 4, since=NOW, converged_at=NOW)),
}
# fmt: on


@pytest.mark.parametrize(
    ("previous", "delta", "version", "online", "ack", "expected"),
    list(SYNC_CASES.values()),
    ids=list(SYNC_CASES),
)
def test_next_sync_status(
    previous: SyncStatus | None,
    delta: Document,
    version: int,
    online: bool,
    ack: Acknowledgement | None,
    expected: SyncStatus,
) -> None:
    result = next_sync_status(
        previous, delta=delta, desired_version=version, online=online, ack=ack, now=NOW
    )
    assert result == expected


def test_next_sync_status_does_not_mutate_or_alias() -> None:
    before = copy.deepcopy(status_to_json(REJECTED_V3))
    result = next_sync_status(
        REJECTED_V3, delta=DELTA, desired_version=3, online=True, ack=None, now=NOW
    )
    assert status_to_json(REJECTED_V3) == before
    with pytest.raises(TypeError):
        result.rejected_properties["x"] = "y"  # type: ignore[index]


def test_a_conversation() -> None:
    """A lamp: desired set while offline, pushed on return, rejected, fixed by the operator."""
    s = next_sync_status(None, delta={}, desired_version=0, online=True, ack=None, now=T0)
    assert s.state is SyncState.IN_SYNC and s.converged_at == T0

    t = T0 + timedelta(hours=1)
    s = next_sync_status(s, delta=DELTA, desired_version=1, online=False, ack=None, now=t)
    assert (s.state, s.since, next_push_due(s)) == (SyncState.STALE, t, None)

    t2 = t + timedelta(hours=3)
    s = next_sync_status(s, delta=DELTA, desired_version=1, online=True, ack=None, now=t2)
    assert (s.state, s.since, next_push_due(s)) == (SyncState.PENDING, t2, t2)
    s = record_push(s, t2)
    assert next_push_due(s) == t2 + timedelta(seconds=5)

    t3 = t2 + timedelta(seconds=2)
    _, ack = split_acknowledgement(
        {
            "$ack": {
                "version": 1,
                "status": "rejected",
                "properties": {"brightness": {"status": "rejected", "reason": "above limit"}},
            }
        }
    )
    s = next_sync_status(s, delta=DELTA, desired_version=1, online=True, ack=ack, now=t3)
    assert s.state is SyncState.REJECTED
    assert dict(s.rejected_properties) == {"brightness": "above limit"}
    assert next_push_due(s) is None

    t4 = t3 + timedelta(minutes=1)
    s = next_sync_status(
        s, delta={"brightness": 70}, desired_version=2, online=True, ack=None, now=t4
    )
    assert (s.state, s.since, s.push_attempts, s.pushed_at) == (SyncState.PENDING, t4, 0, None)
    assert s.rejected_properties == {} and s.rejected_reason == ""

    t5 = t4 + timedelta(seconds=1)
    s = next_sync_status(
        s, delta={}, desired_version=2, online=True, ack=_ack(2, AckStatus.APPLIED), now=t5
    )
    assert (s.state, s.since, s.converged_at) == (SyncState.IN_SYNC, t5, t5)


@pytest.mark.parametrize(
    "build",
    [
        lambda: next_sync_status(
            None, delta={}, desired_version=1, online=True, ack=None, now=datetime(2026, 1, 1)
        ),
        lambda: record_push(_status(SyncState.PENDING), datetime(2026, 1, 1)),
        lambda: SyncStatus(state=SyncState.PENDING, desired_version=1, since=datetime(2026, 1, 1)),
        lambda: _status(SyncState.PENDING, pushed_at=datetime(2026, 1, 1)),
        lambda: _status(SyncState.IN_SYNC, converged_at=datetime(2026, 1, 1)),
    ],
)
def test_naive_datetimes_are_refused(build: Any) -> None:
    with pytest.raises(ValueError, match="aware"):
        build()


@pytest.mark.parametrize("fields", [{"version": -1}, {"push_attempts": -1}])
def test_negative_counts_are_refused(fields: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="negative"):
        _status(SyncState.PENDING, **fields)


def test_plain_strings_become_enums() -> None:
    status = SyncStatus(state="stale", desired_version=1, since=T0)  # type: ignore[arg-type]
    assert status.state is SyncState.STALE
    assert PropertyAck("rejected").status is AckStatus.REJECTED  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        SyncStatus(state="unknown", desired_version=1, since=T0)  # type: ignore[arg-type]


# --- pushes ----------------------------------------------------------------------------------


def test_record_push() -> None:
    status = _status(SyncState.PENDING, rejected_reason="kept as is")
    once = record_push(status, T1)
    twice = record_push(once, NOW)
    assert (once.push_attempts, once.pushed_at) == (1, T1)
    assert (twice.push_attempts, twice.pushed_at) == (2, NOW)
    assert twice.since == T0 and twice.rejected_reason == "kept as is"
    assert status.push_attempts == 0 and status.pushed_at is None


@pytest.mark.parametrize(
    ("state", "pushed_at", "attempts", "expected"),
    [
        (SyncState.IN_SYNC, None, 0, None),
        (SyncState.STALE, None, 0, None),
        (SyncState.STALE, T1, 3, None),
        (SyncState.REJECTED, T1, 1, None),
        (SyncState.PENDING, None, 0, T0),
        (SyncState.PENDING, T1, 1, T1 + timedelta(seconds=5)),
        (SyncState.PENDING, T1, 2, T1 + timedelta(seconds=10)),
        (SyncState.PENDING, T1, 3, T1 + timedelta(seconds=20)),
        (SyncState.PENDING, T1, 7, T1 + timedelta(seconds=320)),
        (SyncState.PENDING, T1, 8, T1 + timedelta(seconds=600)),
        (SyncState.PENDING, T1, 10_000, T1 + timedelta(seconds=600)),
        # Not produced by record_push, but must not go below the base.
        (SyncState.PENDING, T1, 0, T1 + timedelta(seconds=5)),
    ],
)
def test_next_push_due(
    state: SyncState, pushed_at: datetime | None, attempts: int, expected: datetime | None
) -> None:
    status = _status(state, pushed_at=pushed_at, push_attempts=attempts)
    assert next_push_due(status) == expected


@pytest.mark.parametrize(
    ("base", "maximum", "attempts", "seconds"),
    [
        (1, 10, 1, 1),
        (1, 10, 4, 8),
        (1, 10, 5, 10),
        (0.5, 0.5, 9, 0.5),
        (2.5, 3600, 3, 10),
    ],
)
def test_next_push_due_custom_backoff(
    base: float, maximum: float, attempts: int, seconds: float
) -> None:
    status = _status(SyncState.PENDING, pushed_at=T1, push_attempts=attempts)
    due = next_push_due(status, base_seconds=base, max_seconds=maximum)
    assert due == T1 + timedelta(seconds=seconds)


@pytest.mark.parametrize(
    ("base", "maximum"),
    [(0, 10), (-1, 10), (10, 5), (float("nan"), 10), (5, float("inf")), (5, float("nan"))],
)
def test_next_push_due_bad_backoff(base: float, maximum: float) -> None:
    with pytest.raises(ValueError):
        next_push_due(_status(SyncState.PENDING), base_seconds=base, max_seconds=maximum)


def test_push_schedule() -> None:
    """Pushing whenever due gives waits of 5, 10, 20, ... seconds, capped at 600."""
    status = _status(SyncState.PENDING, since=T0)
    waits = []
    now = T0
    for _ in range(10):
        due = next_push_due(status)
        assert due is not None
        waits.append((due - now).total_seconds())
        now = due
        status = record_push(status, now)
    assert waits == [0, 5, 10, 20, 40, 80, 160, 320, 600, 600]


# --- coalesced delta -------------------------------------------------------------------------


def test_a_waking_device_gets_only_final_values() -> None:
    """The delta is computed from the current documents (twin_store), never replayed from the
    history of desired updates: a device back after hours gets one coalesced delta."""
    reported: Document = {"power": True, "brightness": 20, "mode": "auto"}
    desired: Document = {}
    # What an operator did while the lamp slept for hours.
    for patch in [
        {"brightness": 40},
        {"power": False},
        {"brightness": 60, "mode": "eco"},
        {"power": True},
        {"brightness": 80},
        {"mode": "auto"},
        {"schedule": [{"at": "22:00", "level": 40}]},
        {"schedule": [{"at": "23:00", "level": 30}]},
        {"night": {"level": 10}},
        {"night": None},
    ]:
        desired = apply_merge_patch(desired, patch)  # type: ignore[arg-type]
    assert compute_delta(desired, reported) == {
        "brightness": 80,
        "schedule": [{"at": "23:00", "level": 30}],
    }


# --- storage ---------------------------------------------------------------------------------

CET = timezone(timedelta(hours=1))


@pytest.mark.parametrize(
    "status",
    [
        _status(SyncState.PENDING, 0),
        IN_SYNC_V3,
        PENDING_V3,
        REJECTED_V3,
        _status(SyncState.STALE, 2**63 - 1, pushed_at=T1, push_attempts=10_000),
        _status(
            SyncState.REJECTED,
            since=datetime(2026, 3, 29, 2, 30, 0, 123456, tzinfo=CET),
            pushed_at=datetime(1, 1, 1, tzinfo=UTC),
            converged_at=datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
            rejected_reason="ünïcode ✓",
            rejected_properties={"energy.power_w": "", "a": "b"},
        ),
    ],
)
def test_status_json_round_trip(status: SyncStatus) -> None:
    stored = json.loads(json.dumps(status_to_json(status)))
    assert status_from_json(stored) == status
    assert status_to_json(status_from_json(stored)) == stored


def test_status_json_format() -> None:
    status = _status(
        SyncState.REJECTED,
        since=datetime(2026, 11, 23, 11, 0, 0, 5000, tzinfo=CET),
        pushed_at=T1,
        push_attempts=1,
        rejected_reason="no",
        rejected_properties={"brightness": "too bright"},
    )
    assert status_to_json(status) == {
        "state": "rejected",
        "desired_version": 3,
        "since": "2026-11-23T10:00:00.005000Z",
        "pushed_at": "2026-11-23T10:01:00.000000Z",
        "push_attempts": 1,
        "rejected_reason": "no",
        "rejected_properties": {"brightness": "too bright"},
        "converged_at": None,
    }


def test_status_from_json_defaults_and_offsets() -> None:
    status = status_from_json(
        {"state": "pending", "desired_version": 5, "since": "2026-11-23T11:00:00+01:00"}
    )
    assert status == SyncStatus(state=SyncState.PENDING, desired_version=5, since=T0)


_GOOD = status_to_json(REJECTED_V3)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"state": None}, "state is missing"),
        ({"state": "synced"}, "unknown state"),
        ({"state": 1}, "state must be of type str"),
        ({"desired_version": None}, "desired_version is missing"),
        ({"desired_version": "3"}, "desired_version must be of type int"),
        ({"desired_version": True}, "desired_version must be of type int"),
        ({"desired_version": -1}, "desired_version must not be negative"),
        ({"push_attempts": 1.5}, "push_attempts must be of type int"),
        ({"push_attempts": -1}, "push_attempts must not be negative"),
        ({"since": None}, "since is missing"),
        ({"since": "yesterday"}, "since 'yesterday' is not an RFC 3339 time"),
        ({"since": "2026-11-23T10:00:00"}, "since '2026-11-23T10:00:00' has no UTC offset"),
        ({"pushed_at": 5}, "pushed_at must be of type str"),
        ({"converged_at": "2026-13-01T00:00:00Z"}, "converged_at"),
        ({"rejected_reason": 5}, "rejected_reason must be of type str"),
        ({"rejected_properties": []}, "rejected_properties must be of type dict"),
        ({"rejected_properties": {"a": 1}}, "rejected_properties must map strings to strings"),
    ],
)
def test_status_from_json_refuses_bad_data(changes: dict[str, Any], message: str) -> None:
    data = {**_GOOD, **changes}
    with pytest.raises(ValueError, match=message):
        status_from_json(data)


def test_status_from_json_needs_an_object() -> None:
    with pytest.raises(ValueError, match="must be a JSON object"):
        status_from_json([])  # type: ignore[arg-type]
