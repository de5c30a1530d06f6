"""Reconciliation of desired against reported state: acknowledgements and sync status.

Pure logic, no I/O. A device report may carry, as the reserved top-level member `$ack`, an
acknowledgement of the desired version it answers (modelled on Azure IoT Hub's writable-property
acknowledgements):

    {"$ack": {"version": 7, "status": "rejected", "reason": "...",
              "properties": {"brightness": {"status": "rejected", "reason": "above limit"}}}}

`split_acknowledgement` takes it out of the report; `next_sync_status` folds it, the current
delta and the device's liveness into the twin's `SyncStatus`, which the reconciler stores as JSON
(`status_to_json` / `status_from_json`) and uses to pace re-notifications (`record_push`,
`next_push_due`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from types import MappingProxyType
from typing import Any

from twin.errors import InvalidArgument
from twin.merge_patch import MAX_KEY_LENGTH, Document

ACK_MEMBER = "$ack"
MAX_ACK_REASON_LENGTH = 256
MAX_ACK_PROPERTIES = 64
# As deep as check_patch lets a twin document nest, so every reachable property can be named.
MAX_PROPERTY_PATH_SEGMENTS = 16
_INT64_MAX = 2**63 - 1
# Characters a twin key may not contain (check_patch refuses them), so a path segment can't either.
_PATH_SYNTAX = frozenset(".[]")


class AckStatus(StrEnum):
    """What a device says it did with a desired version (or one property of it)."""

    APPLIED = "applied"
    IN_PROGRESS = "in-progress"
    REJECTED = "rejected"


_ACK_STATUSES = ", ".join(s.value for s in AckStatus)


class InvalidAcknowledgement(InvalidArgument):
    """An `$ack` member is malformed at `path` (e.g. `$ack.properties.brightness.status`)."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


@dataclass(frozen=True)
class PropertyAck:
    """The device's answer for one desired property."""

    status: AckStatus
    reason: str = ""

    def __post_init__(self) -> None:
        # Accept the plain string too, so `is` comparisons on the enum stay valid.
        object.__setattr__(self, "status", AckStatus(self.status))


def _frozen_mapping(value: Mapping[str, Any]) -> Mapping[str, Any]:
    # A frozen dataclass does not stop mutation of a dict it holds; a read-only proxy over a
    # private copy does (copying even a proxy, whose underlying dict someone may still hold).
    return MappingProxyType(dict(value))


@dataclass(frozen=True)
class Acknowledgement:
    """A device's answer to desired version `version`; `properties` maps dotted property paths
    (e.g. `energy.power_w`) to per-property answers."""

    version: int
    status: AckStatus
    reason: str = ""
    properties: Mapping[str, PropertyAck] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "status", AckStatus(self.status))
        object.__setattr__(self, "properties", _frozen_mapping(self.properties))

    @property
    def rejects(self) -> bool:
        """Whether the device refuses the version as a whole or any property of it."""
        return self.status is AckStatus.REJECTED or any(
            p.status is AckStatus.REJECTED for p in self.properties.values()
        )


def split_acknowledgement(
    report: Mapping[str, Any],
) -> tuple[dict[str, Any], Acknowledgement | None]:
    """Split a device report into its reported-state merge patch and its `$ack`, if any.

    The report itself is not mutated; the returned patch is a new top-level dict whose member
    values are the report's own (not copies), to be checked as any patch is. Only the top-level
    `$ack` is reserved. A malformed `$ack` (including `"$ack": null`, which could only be a
    device bug since the server never stores it) raises InvalidAcknowledgement, an
    InvalidArgument whose message starts with the offending path, e.g.
    `$ack.status: must be one of applied, in-progress, rejected`.

    Rules: `version` an integer in 0..2**63-1 (integral floats such as 7.0 are taken, since
    protobuf's Struct carries numbers as doubles); `status` one of the AckStatus values;
    `reason` optional, a string of at most 256 characters; `properties` optional, an object of
    at most 64 dotted property paths each mapping to `{"status": ..., "reason": ...}` with the
    same rules. Unknown members are refused so a misspelt field is not silently ignored.
    """
    if not isinstance(report, Mapping):
        raise InvalidArgument("report must be a JSON object")
    patch = {key: value for key, value in report.items() if key != ACK_MEMBER}
    if ACK_MEMBER not in report:
        return patch, None
    return patch, _parse_ack(report[ACK_MEMBER])


def _parse_ack(raw: object) -> Acknowledgement:
    where = ACK_MEMBER
    members = _object(raw, where, required={"version", "status"}, optional={"reason", "properties"})
    version = _version(members["version"], f"{where}.version")
    status = _status(members["status"], f"{where}.status")
    reason = _reason(members.get("reason"), f"{where}.reason")
    properties: dict[str, PropertyAck] = {}
    raw_properties = members.get("properties")
    if raw_properties is not None:
        where_properties = f"{where}.properties"
        if not isinstance(raw_properties, Mapping):
            raise InvalidAcknowledgement(where_properties, "must be an object")
        if len(raw_properties) > MAX_ACK_PROPERTIES:
            raise InvalidAcknowledgement(
                where_properties,
                f"has {len(raw_properties)} members; the limit is {MAX_ACK_PROPERTIES}",
            )
        for path, item in raw_properties.items():
            _check_property_path(path, where_properties)
            where_item = f"{where_properties}.{path}"
            item_members = _object(item, where_item, required={"status"}, optional={"reason"})
            properties[path] = PropertyAck(
                status=_status(item_members["status"], f"{where_item}.status"),
                reason=_reason(item_members.get("reason"), f"{where_item}.reason"),
            )
    return Acknowledgement(version=version, status=status, reason=reason, properties=properties)


def _object(
    raw: object, where: str, *, required: set[str], optional: set[str]
) -> Mapping[str, object]:
    if not isinstance(raw, Mapping):
        raise InvalidAcknowledgement(where, "must be an object")
    for key in raw:
        if key not in required and key not in optional:
            allowed = ", ".join(sorted(required | optional))
            raise InvalidAcknowledgement(where, f"unknown member {key!r} (expected {allowed})")
    for key in sorted(required):
        if key not in raw:
            raise InvalidAcknowledgement(f"{where}.{key}", "is required")
    return raw


def _version(raw: object, where: str) -> int:
    if isinstance(raw, float) and math.isfinite(raw) and raw.is_integer():
        raw = int(raw)
    if isinstance(raw, bool) or not isinstance(raw, int):
        raise InvalidAcknowledgement(where, "must be an integer")
    if not 0 <= raw <= _INT64_MAX:
        raise InvalidAcknowledgement(where, f"must be between 0 and {_INT64_MAX}")
    return raw


def _status(raw: object, where: str) -> AckStatus:
    if isinstance(raw, str):
        try:
            return AckStatus(raw)
        except ValueError:
            pass
    raise InvalidAcknowledgement(where, f"must be one of {_ACK_STATUSES}")


def _reason(raw: object, where: str) -> str:
    if raw is None:
        return ""
    if not isinstance(raw, str):
        raise InvalidAcknowledgement(where, "must be a string")
    if len(raw) > MAX_ACK_REASON_LENGTH:
        raise InvalidAcknowledgement(
            where, f"is {len(raw)} characters long; the limit is {MAX_ACK_REASON_LENGTH}"
        )
    return raw


def _check_property_path(path: object, where: str) -> None:
    if not isinstance(path, str) or not path:
        raise InvalidAcknowledgement(where, f"key {path!r} is not a property path")
    segments = path.split(".")
    if len(segments) > MAX_PROPERTY_PATH_SEGMENTS:
        raise InvalidAcknowledgement(
            where,
            f"key {path[:64]!r} has {len(segments)} segments; "
            f"the limit is {MAX_PROPERTY_PATH_SEGMENTS}",
        )
    for segment in segments:
        if not segment or len(segment) > MAX_KEY_LENGTH or not _PATH_SYNTAX.isdisjoint(segment):
            raise InvalidAcknowledgement(
                where,
                f"key {path[:64]!r} is not a dotted property path (non-empty members of at most "
                f"{MAX_KEY_LENGTH} characters without '[' or ']')",
            )


# --- sync status -----------------------------------------------------------------------------


class SyncState(StrEnum):
    """How a twin's reported state stands against its desired state."""

    IN_SYNC = "in-sync"
    PENDING = "pending"
    STALE = "stale"
    REJECTED = "rejected"


def _require_aware(moment: datetime | None, name: str) -> None:
    if moment is not None and (moment.tzinfo is None or moment.utcoffset() is None):
        raise ValueError(f"{name} must be an aware datetime")


# Keyword-only: eight fields, several of the same type, are too easy to pass in the wrong order.
@dataclass(frozen=True, kw_only=True)
class SyncStatus:
    """The reconciliation state of one twin.

    `desired_version` is the desired version this status is about; `pushed_at`/`push_attempts`
    count re-notifications of that desired version; `rejected_reason`/`rejected_properties`
    (path -> reason) are filled only when REJECTED; `converged_at` is when the twin last became
    IN_SYNC; `since` is when `state` last changed. Every datetime must be aware.
    """

    state: SyncState
    desired_version: int
    pushed_at: datetime | None = None
    push_attempts: int = 0
    rejected_reason: str = ""
    rejected_properties: Mapping[str, str] = field(default_factory=dict)
    converged_at: datetime | None = None
    since: datetime

    def __post_init__(self) -> None:
        object.__setattr__(self, "state", SyncState(self.state))
        _require_aware(self.since, "since")
        _require_aware(self.pushed_at, "pushed_at")
        _require_aware(self.converged_at, "converged_at")
        if self.desired_version < 0 or self.push_attempts < 0:
            raise ValueError("desired_version and push_attempts must not be negative")
        object.__setattr__(self, "rejected_properties", _frozen_mapping(self.rejected_properties))


def next_sync_status(
    previous: SyncStatus | None,
    *,
    delta: Document,
    desired_version: int,
    online: bool,
    ack: Acknowledgement | None,
    now: datetime,
) -> SyncStatus:
    """The sync status after an event (a report, a desired update, a liveness change).

    * No delta: IN_SYNC; `converged_at` becomes `now` on entering IN_SYNC and is kept while it
      stays there.
    * A delta and a rejection of the current `desired_version` (the whole version or any of its
      properties): REJECTED with the reasons. The rejection is sticky: later events for the same
      version without a new ack (a telemetry report, a liveness change) keep it, since the
      device already said it will not converge; a new ack for that version saying applied or
      in-progress lifts it. Acks for any other version are ignored, so once desired changes the
      old rejection no longer counts and the device is expected to try again.
    * Otherwise a delta is PENDING while the device is online and STALE while it is offline.

    `since` moves to `now` only when the state changes. The push bookkeeping carries over
    unless `desired_version` changed, in which case it restarts (no push yet, 0 attempts) so
    the new version is pushed at once.
    """
    _require_aware(now, "now")
    version_changed = previous is None or previous.desired_version != desired_version
    rejected_reason = ""
    rejected_properties: dict[str, str] = {}
    converged_at = None if previous is None else previous.converged_at
    if not delta:
        state = SyncState.IN_SYNC
        if previous is None or previous.state is not SyncState.IN_SYNC:
            converged_at = now
    elif ack is not None and ack.version == desired_version:
        if ack.rejects:
            state = SyncState.REJECTED
            rejected_reason = ack.reason
            rejected_properties = {
                path: p.reason
                for path, p in ack.properties.items()
                if p.status is AckStatus.REJECTED
            }
        else:
            state = SyncState.PENDING if online else SyncState.STALE
    elif previous is not None and not version_changed and previous.state is SyncState.REJECTED:
        state = SyncState.REJECTED
        rejected_reason = previous.rejected_reason
        rejected_properties = dict(previous.rejected_properties)
    else:
        state = SyncState.PENDING if online else SyncState.STALE
    since = now if previous is None or previous.state is not state else previous.since
    if previous is None or version_changed:
        pushed_at, push_attempts = None, 0
    else:
        pushed_at, push_attempts = previous.pushed_at, previous.push_attempts
    return SyncStatus(
        state=state,
        desired_version=desired_version,
        since=since,
        pushed_at=pushed_at,
        push_attempts=push_attempts,
        rejected_reason=rejected_reason,
        rejected_properties=rejected_properties,
        converged_at=converged_at,
    )


def record_push(status: SyncStatus, now: datetime) -> SyncStatus:
    """`status` after the reconciler notified the device once more (one more attempt, at
    `now`)."""
    _require_aware(now, "now")
    return replace(status, pushed_at=now, push_attempts=status.push_attempts + 1)


# 2**62 seconds dwarfs any sensible maximum; capping the exponent keeps the arithmetic finite.
_MAX_EXPONENT = 62


def next_push_due(
    status: SyncStatus, *, base_seconds: float = 5, max_seconds: float = 600
) -> datetime | None:
    """When the reconciler should next notify the device of its desired state; None unless
    PENDING (an offline device cannot be reached, an in-sync or rejected one need not be).

    The first push is due as soon as the twin became PENDING (`since`); after that the wait
    doubles from `base_seconds` per attempt up to `max_seconds`:
    `pushed_at + min(max_seconds, base_seconds * 2**(push_attempts - 1))`. The result may lie
    in the past, meaning "now". ValueError unless 0 < base_seconds <= max_seconds, both finite.
    """
    if not (
        math.isfinite(base_seconds)
        and math.isfinite(max_seconds)
        and 0 < base_seconds <= max_seconds
    ):
        raise ValueError("next_push_due needs finite 0 < base_seconds <= max_seconds")
    if status.state is not SyncState.PENDING:
        return None
    if status.pushed_at is None:
        return status.since
    exponent = min(max(status.push_attempts - 1, 0), _MAX_EXPONENT)
    return status.pushed_at + timedelta(seconds=min(max_seconds, base_seconds * 2**exponent))


# --- storage ---------------------------------------------------------------------------------


def _format_time(moment: datetime | None) -> str | None:
    # Microseconds (not twin.metadata's milliseconds) so that a stored status reads back equal.
    if moment is None:
        return None
    return moment.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def status_to_json(status: SyncStatus) -> dict[str, Any]:
    """`status` as JSON-able data (times as RFC 3339 UTC strings); inverse of
    status_from_json."""
    return {
        "state": status.state.value,
        "desired_version": status.desired_version,
        "since": _format_time(status.since),
        "pushed_at": _format_time(status.pushed_at),
        "push_attempts": status.push_attempts,
        "rejected_reason": status.rejected_reason,
        "rejected_properties": dict(status.rejected_properties),
        "converged_at": _format_time(status.converged_at),
    }


def status_from_json(data: Mapping[str, Any]) -> SyncStatus:
    """The SyncStatus stored as `data` by status_to_json.

    ValueError if a field is missing or malformed: stored data that does not parse is a defect
    of the service, not of a caller's request, hence not an InvalidArgument.
    """
    if not isinstance(data, Mapping):
        raise ValueError("sync status must be a JSON object")
    state_name = _field(data, "state", str)
    try:
        state = SyncState(state_name)
    except ValueError:
        raise ValueError(f"sync status: unknown state {state_name!r}") from None
    rejected = _field(data, "rejected_properties", dict, {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in rejected.items()):
        raise ValueError("sync status: rejected_properties must map strings to strings")
    return SyncStatus(
        state=state,
        desired_version=_count(data, "desired_version"),
        since=_parse_time(_field(data, "since", str), "since"),
        pushed_at=_optional_time(data, "pushed_at"),
        push_attempts=_count(data, "push_attempts", 0),
        rejected_reason=_field(data, "rejected_reason", str, ""),
        rejected_properties=rejected,
        converged_at=_optional_time(data, "converged_at"),
    )


_MISSING: Any = object()


def _field(data: Mapping[str, Any], name: str, kind: type, default: Any = _MISSING) -> Any:
    value = data.get(name)
    if value is None:
        if default is _MISSING:
            raise ValueError(f"sync status: {name} is missing")
        return default
    # bool is an int subclass; a count must not take true/false.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"sync status: {name} must be of type {kind.__name__}")
    return value


def _count(data: Mapping[str, Any], name: str, default: Any = _MISSING) -> int:
    value: int = _field(data, name, int, default)
    if value < 0:
        raise ValueError(f"sync status: {name} must not be negative")
    return value


def _optional_time(data: Mapping[str, Any], name: str) -> datetime | None:
    text = _field(data, name, str, None)
    return None if text is None else _parse_time(text, name)


def _parse_time(text: str, name: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"sync status: {name} {text!r} is not an RFC 3339 time") from None
    if moment.tzinfo is None:
        raise ValueError(f"sync status: {name} {text!r} has no UTC offset")
    return moment
