"""The delta of a twin: what the device still has to do to reach its desired state."""

from __future__ import annotations

from twin.merge_patch import Document, clone, json_equal


def compute_delta(desired: Document, reported: Document) -> Document:
    """The leaves of `desired` whose value differs from `reported`, keeping their nesting.

    Objects recurse and arrays compare whole. A desired object where `reported` has a
    non-object or nothing contributes all its leaves; empty desired objects contribute
    nothing. Numbers compare by value (1 == 1.0), booleans never equal numbers.
    """
    result: Document = {}
    for key, want in desired.items():
        present = key in reported
        have = reported.get(key)
        if isinstance(want, dict):
            inner = compute_delta(want, have if isinstance(have, dict) else {})
            if inner:
                result[key] = inner
        elif not present or not json_equal(want, have):
            result[key] = clone(want)
    return result


def has_delta(desired: Document, reported: Document) -> bool:
    """Whether `compute_delta(desired, reported)` would be non-empty (without building it)."""
    for key, want in desired.items():
        have = reported.get(key)
        if isinstance(want, dict):
            if has_delta(want, have if isinstance(have, dict) else {}):
                return True
        elif key not in reported or not json_equal(want, have):
            return True
    return False
