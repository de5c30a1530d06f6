"""Per-leaf timestamps of twin documents.

A metadata document mirrors its data document: every leaf (scalar or array) of the data maps
to the RFC 3339 UTC time, with milliseconds, at which it last changed. That is the time the
change was committed, except for values that came as telemetry: those carry the time the
device measured them, so that an older measurement arriving late (a pack held back in a
sensor's queue) can be told apart from a newer one and does not overwrite it
(`drop_superseded`).
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


def update_metadata(
    metadata: Document, applied_patch: Document, timestamp: str | Document
) -> Document:
    """The metadata after `applied_patch` (an effective patch) was applied to its document.

    A null deletes the mirrored member, a scalar or array leaf gets `timestamp`, an object
    recurses (replacing a leaf's timestamp if the member used to be a leaf); an empty object
    yields `{}` where nothing was. `timestamp` is one time for every leaf, or a document of
    times mirroring the patch's leaves (telemetry, see `drop_superseded`). `metadata` is not
    mutated.
    """
    result: Document = {}
    for key, value in metadata.items():
        if key not in applied_patch:
            result[key] = clone(value)
        elif applied_patch[key] is not None:
            result[key] = _stamp(value, applied_patch[key], _member(timestamp, key))
    for key, change in applied_patch.items():
        if key not in metadata and change is not None:
            result[key] = _stamp(None, change, _member(timestamp, key))
    return result


def _member(timestamp: str | Document, key: str) -> str | Document:
    if isinstance(timestamp, str):
        return timestamp
    member = timestamp[key]
    if not isinstance(member, str | dict):
        raise ValueError(f"timestamps must be strings or objects, not {member!r} at {key!r}")
    return member


def _stamp(current: object, change: object, timestamp: str | Document) -> str | Document:
    if isinstance(change, dict):
        return update_metadata(current if isinstance(current, dict) else {}, change, timestamp)
    if not isinstance(timestamp, str):
        raise ValueError("a leaf of the patch needs a timestamp, not an object of them")
    return timestamp


def drop_superseded(patch: Document, times: Document, metadata: Document) -> Document:
    """`patch` without the leaves that `metadata` says changed later than `times` (a document
    of timestamps mirroring the patch's leaves) says they were measured: what remains is what
    is newer than the document holds. An object left empty by that is dropped whole (it
    would otherwise create an empty member). Timestamps compare as text, which orders them
    because format_timestamp writes them at a fixed width. Nothing is mutated."""
    result: Document = {}
    for key, change in patch.items():
        stored = metadata.get(key)
        when = times[key]
        if isinstance(change, dict) and isinstance(when, dict):
            newer = drop_superseded(change, when, stored if isinstance(stored, dict) else {})
            if newer or not change:
                result[key] = newer
        elif not (isinstance(stored, str) and isinstance(when, str) and stored > when):
            result[key] = change
    return result
