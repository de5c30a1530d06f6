"""JSON Merge Patch (RFC 7396) on twin documents, and the checks an incoming patch must pass.

Everything here is pure: results are new values that share no mutable structure with the
arguments, so a caller may keep, mutate or store them without aliasing surprises.
"""

from __future__ import annotations

import json
import math
from typing import TypeAlias

from twin.errors import InvalidArgument, PayloadTooLarge

JSON: TypeAlias = dict[str, "JSON"] | list["JSON"] | str | int | float | bool | None
Document: TypeAlias = dict[str, JSON]

MAX_KEY_LENGTH = 128
# Key characters that the selector and profile path syntax give a meaning to.
_PATH_SYNTAX = frozenset(".[]")
# Integers are stored as JSON numbers by SQLite and PostgreSQL alike; keep them in int64.
_INT_MIN = -(2**63)
_INT_MAX = 2**63 - 1
# Beyond 2**53 a double no longer holds every integer, so integral-looking floats stay floats.
_SAFE_FLOAT_INT = 2**53


def clone(value: JSON) -> JSON:
    """A deep copy of a JSON value (much cheaper than copy.deepcopy)."""
    if isinstance(value, dict):
        return {k: clone(v) for k, v in value.items()}
    if isinstance(value, list):
        return [clone(v) for v in value]
    return value


def json_equal(a: JSON, b: JSON) -> bool:
    """JSON equality: numbers compare by value (1 == 1.0) but booleans never equal numbers."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(json_equal(v, b[k]) for k, v in a.items())
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(json_equal(x, y) for x, y in zip(a, b, strict=True))
    if type(a) is not type(b):
        return False
    return a == b


def apply_merge_patch(target: Document, patch: Document) -> Document:
    """The document `target` becomes after applying the merge patch `patch` (RFC 7396).

    `null` deletes a member, objects merge recursively, anything else replaces. Member order of
    `target` is kept; new members follow in patch order. Neither argument is mutated.
    """
    return _merge_object(target, patch)


def _merge_object(target: Document, patch: Document) -> Document:
    result: Document = {}
    for key, value in target.items():
        if key not in patch:
            result[key] = clone(value)
        elif patch[key] is not None:
            result[key] = _merge_value(value, patch[key])
    for key, change in patch.items():
        if key not in target and change is not None:
            result[key] = _merge_value(None, change)
    return result


def _merge_value(current: JSON, change: JSON) -> JSON:
    if isinstance(change, dict):
        return _merge_object(current if isinstance(current, dict) else {}, change)
    return clone(change)


def effective_patch(target: Document, patch: Document) -> Document:
    """The smallest patch with the same effect on `target` as `patch`; `{}` means no change.

    Members already equal to the target's are dropped, as are nulls for absent members; objects
    recurse. An object replacing a non-object (or filling an absent member) appears as the
    object the merge produces, i.e. without its nulls.
    """
    result: Document = {}
    for key, change in patch.items():
        present = key in target
        current = target.get(key)
        if change is None:
            if present:
                result[key] = None
        elif isinstance(change, dict):
            if present and isinstance(current, dict):
                inner = effective_patch(current, change)
                if inner:
                    result[key] = inner
            else:
                result[key] = _merge_object({}, change)
        elif not present or not json_equal(current, change):
            result[key] = clone(change)
    return result


def check_patch(patch: object, *, max_bytes: int = 65536, max_depth: int = 16) -> Document:
    """Validate an incoming merge patch and return it normalised.

    The patch must be a JSON object whose keys are non-empty strings of at most 128 characters
    without `.`, `[` or `]`; numbers must be finite and integers within int64. Nesting deeper
    than `max_depth` (the patch object itself is depth 1) or an encoding longer than
    `max_bytes` is PayloadTooLarge; everything else wrong is InvalidArgument.

    Normalisation: integral floats become ints (protobuf's Struct carries every number as a
    double, so 40 arrives as 40.0), except beyond 2**53 where a double's integer-ness means
    nothing.
    """
    if not isinstance(patch, dict):
        raise InvalidArgument("patch must be a JSON object")
    result = _check_object(patch, "", 1, max_depth)
    size = len(json.dumps(result, separators=(",", ":")).encode())
    if size > max_bytes:
        raise PayloadTooLarge(f"patch is {size} bytes; the limit is {max_bytes}")
    return result


def _where(path: str) -> str:
    return f"at {path!r}" if path else "at the top level"


def _check_object(value: dict[object, object], path: str, depth: int, max_depth: int) -> Document:
    if depth > max_depth:
        raise PayloadTooLarge(f"patch nests deeper than {max_depth} levels {_where(path)}")
    result: Document = {}
    for key, member in value.items():
        if not isinstance(key, str):
            raise InvalidArgument(f"patch key {key!r} {_where(path)} is not a string")
        if not key:
            raise InvalidArgument(f"patch key {_where(path)} is empty")
        if len(key) > MAX_KEY_LENGTH:
            raise InvalidArgument(
                f"patch key {key[:32]!r}... {_where(path)} is {len(key)} characters long; "
                f"the limit is {MAX_KEY_LENGTH}"
            )
        if not _PATH_SYNTAX.isdisjoint(key):
            raise InvalidArgument(
                f"patch key {key!r} {_where(path)} contains '.', '[' or ']' (path syntax)"
            )
        child = f"{path}.{key}" if path else key
        result[key] = _check_value(member, child, depth, max_depth)
    return result


def _check_value(value: object, path: str, depth: int, max_depth: int) -> JSON:
    # `depth` is that of the container holding `value`.
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        if not _INT_MIN <= value <= _INT_MAX:
            raise InvalidArgument(f"patch value at {path!r} is outside the 64-bit integer range")
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidArgument(f"patch value at {path!r} is not a finite number")
        if value.is_integer() and abs(value) <= _SAFE_FLOAT_INT:
            return int(value)
        return value
    if isinstance(value, dict):
        return _check_object(value, path, depth + 1, max_depth)
    if isinstance(value, list):
        if depth + 1 > max_depth:
            raise PayloadTooLarge(f"patch nests deeper than {max_depth} levels at {path!r}")
        return [
            _check_value(item, f"{path}[{i}]", depth + 1, max_depth) for i, item in enumerate(value)
        ]
    raise InvalidArgument(f"patch value at {path!r} is not JSON ({type(value).__name__})")
