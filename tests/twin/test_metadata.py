"""Per-leaf timestamps of twin documents."""

from __future__ import annotations

import copy
import random
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from tests.twin.test_merge_patch import random_document
from twin.merge_patch import JSON, Document, apply_merge_patch, effective_patch
from twin.metadata import drop_superseded, format_timestamp, update_metadata

T0 = "2026-11-23T10:00:00.000Z"
T1 = "2026-11-23T11:00:00.000Z"


@pytest.mark.parametrize(
    ("moment", "text"),
    [
        (datetime(2026, 11, 23, 10, 0, 0, 123456, tzinfo=UTC), "2026-11-23T10:00:00.123Z"),
        (datetime(2026, 11, 23, 10, 0, 0, tzinfo=UTC), "2026-11-23T10:00:00.000Z"),
        (datetime(2026, 11, 23, 10, 0, 0, 999999, tzinfo=UTC), "2026-11-23T10:00:00.999Z"),
        (
            datetime(
                2026, 11, 23, 11, 30, 5, 7000, tzinfo=timezone(timedelta(hours=1, minutes=30))
            ),
            "2026-11-23T10:00:05.007Z",
        ),
        (
            datetime(2026, 1, 1, 0, 30, tzinfo=timezone(timedelta(hours=2))),
            "2025-12-31T22:30:00.000Z",
        ),
        (datetime(999, 2, 3, 4, 5, 6, tzinfo=UTC), "0999-02-03T04:05:06.000Z"),
    ],
)
def test_format_timestamp(moment: datetime, text: str) -> None:
    assert format_timestamp(moment) == text
    assert datetime.fromisoformat(text) == moment.replace(
        microsecond=moment.microsecond // 1000 * 1000
    )


def test_format_timestamp_refuses_naive() -> None:
    with pytest.raises(ValueError, match="aware"):
        format_timestamp(datetime(2026, 11, 23, 10, 0))


@pytest.mark.parametrize(
    ("metadata", "patch", "expected"),
    [
        ({}, {}, {}),
        ({}, {"a": 1}, {"a": T1}),
        ({"a": T0}, {"a": 2}, {"a": T1}),
        ({"a": T0, "b": T0}, {"a": None}, {"b": T0}),
        ({"a": T0}, {"b": None}, {"a": T0}),
        ({}, {"a": [1, {"b": 2}]}, {"a": T1}),
        ({"a": {"b": T0}}, {"a": [1]}, {"a": T1}),
        ({}, {"a": {"b": 1, "c": {"d": "x"}}}, {"a": {"b": T1, "c": {"d": T1}}}),
        ({"a": {"b": T0, "c": T0}}, {"a": {"b": 5}}, {"a": {"b": T1, "c": T0}}),
        ({"a": {"b": T0, "c": T0}}, {"a": {"b": None}}, {"a": {"c": T0}}),
        ({"a": T0}, {"a": {"b": 1}}, {"a": {"b": T1}}),
        ({"a": T0}, {"a": {}}, {"a": {}}),
        ({}, {"a": {}}, {"a": {}}),
        ({"a": {"b": T0}}, {"a": {}}, {"a": {"b": T0}}),
        ({"a": {"b": T0}}, {"a": None}, {}),
        ({"x": T0}, {"a": {"b": {"c": None}}}, {"x": T0, "a": {"b": {}}}),
    ],
)
def test_update_metadata(metadata: Document, patch: Document, expected: Document) -> None:
    assert update_metadata(metadata, patch, T1) == expected


def test_update_metadata_does_not_mutate_or_alias() -> None:
    metadata: Document = {"a": {"b": T0}, "k": {"l": T0}}
    patch: Document = {"a": {"c": 1}}
    before = copy.deepcopy((metadata, patch))
    result: Any = update_metadata(metadata, patch, T1)
    result["k"]["l"] = "changed"
    result["a"]["b"] = "changed"
    assert (metadata, patch) == before


def _shape(value: JSON) -> JSON:
    """The document with every leaf replaced by "leaf": what its metadata must look like."""
    if isinstance(value, dict):
        return {k: _shape(v) for k, v in value.items()}
    return "leaf"


@pytest.mark.parametrize("seed", range(20))
def test_metadata_mirrors_document_through_patch_sequences(seed: int) -> None:
    rng = random.Random(seed)
    document: Document = {}
    metadata: Document = {}
    for step in range(60):
        patch = random_document(rng, 0, nulls=True)
        applied = effective_patch(document, patch)
        document = apply_merge_patch(document, applied)
        stamp = f"2026-11-23T10:00:{step:02d}.000Z"
        metadata = update_metadata(metadata, applied, stamp)
        assert _shape(metadata) == _shape(document)


T2 = "2026-11-23T12:00:00.000Z"


def test_leaves_can_carry_times_of_their_own() -> None:
    metadata = {"noise_db": T0, "energy": {"total_wh": T0, "power_w": T0}}
    applied = {"noise_db": 50, "energy": {"total_wh": 7}}
    times = {"noise_db": T1, "energy": {"total_wh": T2}}
    assert update_metadata(metadata, applied, times) == {
        "noise_db": T1,
        "energy": {"total_wh": T2, "power_w": T0},
    }
    with pytest.raises(ValueError, match="leaf"):
        update_metadata({}, {"noise_db": 50}, {"noise_db": {"nested": T1}})


@pytest.mark.parametrize(
    ("patch", "times", "metadata", "expected"),
    [
        # Newer than what is stored, or nothing stored: taken.
        ({"a": 1}, {"a": T2}, {"a": T1}, {"a": 1}),
        ({"a": 1}, {"a": T1}, {}, {"a": 1}),
        # Same time: taken (the later arrival of two equally new values wins, as in a pack).
        ({"a": 1}, {"a": T1}, {"a": T1}, {"a": 1}),
        # Older than what is stored: dropped.
        ({"a": 1, "b": 2}, {"a": T0, "b": T2}, {"a": T1, "b": T1}, {"b": 2}),
        # Nested: an object emptied by that is dropped whole, not sent as {}.
        ({"e": {"wh": 5}}, {"e": {"wh": T0}}, {"e": {"wh": T1}}, {}),
        ({"e": {"wh": 5, "w": 1}}, {"e": {"wh": T0, "w": T2}}, {"e": {"wh": T1}}, {"e": {"w": 1}}),
        # Stored as an object where the patch has a leaf (or the reverse): taken.
        ({"e": 5}, {"e": T0}, {"e": {"wh": T1}}, {"e": 5}),
        ({"e": {"wh": 5}}, {"e": {"wh": T0}}, {"e": T1}, {"e": {"wh": 5}}),
    ],
)
def test_drop_superseded(
    patch: Document, times: Document, metadata: Document, expected: Document
) -> None:
    before = copy.deepcopy(patch)
    assert drop_superseded(patch, times, metadata) == expected
    assert patch == before
