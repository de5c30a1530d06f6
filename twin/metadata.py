"""Per-leaf timestamps of twin documents.

A metadata document mirrors its data document: every leaf (scalar or array) of the data maps
to the RFC 3339 UTC time, with milliseconds, at which it last changed.
"""

from __future__ import annotations

from datetime import UTC, datetime

from twin.merge_patch import Document, clone


def format_timestamp(moment: datetime) -> str:
    """`moment` (an aware datetime) as RFC 3339 in UTC with milliseconds, e.g.
    `2026-11-23T10:00:00.123Z`; ValueError for a naive datetime."""
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError("format_timestamp needs an aware datetime")
    t = moment.astimezone(UTC)
    # Formatted by hand: strftime does not zero-pad years before 1000 on every platform, and
    # truncating (not rounding) microseconds can never carry into the next second.
    return (
        f"{t.year:04d}-{t.month:02d}-{t.day:02d}T{t.hour:02d}:{t.minute:02d}:{t.second:02d}"
        f".{t.microsecond // 1000:03d}Z"
    )


def update_metadata(metadata: Document, applied_patch: Document, timestamp: str) -> Document:
    """The metadata after `applied_patch` (an effective patch) was applied to its document.

    A null deletes the mirrored member, a scalar or array leaf gets `timestamp`, an object
    recurses (replacing a leaf's timestamp if the member used to be a leaf); an empty object
    yields `{}` where nothing was. `metadata` is not mutated.
    """
    result: Document = {}
    for key, value in metadata.items():
        if key not in applied_patch:
            result[key] = clone(value)
        elif applied_patch[key] is not None:
            result[key] = _stamp(value, applied_patch[key], timestamp)
    for key, change in applied_patch.items():
        if key not in metadata and change is not None:
            result[key] = _stamp(None, change, timestamp)
    return result


def _stamp(current: object, change: object, timestamp: str) -> str | Document:
    if isinstance(change, dict):
        return update_metadata(current if isinstance(current, dict) else {}, change, timestamp)
    return timestamp
