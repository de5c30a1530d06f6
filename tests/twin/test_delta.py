"""The delta between desired and reported state."""

from __future__ import annotations

import copy
import random
from typing import Any

import pytest

from tests.twin.test_merge_patch import random_document
from twin.delta import compute_delta, has_delta
from twin.merge_patch import Document, apply_merge_patch


@pytest.mark.parametrize(
    ("desired", "reported", "expected"),
    [
        ({}, {}, {}),
        ({}, {"a": 1}, {}),
        ({"a": 1}, {}, {"a": 1}),
        ({"a": 1}, {"a": 1}, {}),
        ({"a": 1}, {"a": 2}, {"a": 1}),
        ({"a": 1}, {"a": 1.0}, {}),
        ({"a": 1.0}, {"a": 1}, {}),
        ({"a": True}, {"a": 1}, {"a": True}),
        ({"a": 1}, {"a": True}, {"a": 1}),
        ({"a": 0}, {"a": False}, {"a": 0}),
        ({"a": "1"}, {"a": 1}, {"a": "1"}),
        ({"a": [1, 2]}, {"a": [1, 2]}, {}),
        ({"a": [1, 2]}, {"a": [1, 2, 3]}, {"a": [1, 2]}),
        ({"a": [{"b": 1}]}, {"a": [{"b": 1.0}]}, {}),
        ({"a": [{"b": 1}]}, {"a": [{"b": 2}]}, {"a": [{"b": 1}]}),
        ({"a": {"b": 1, "c": 2}}, {"a": {"b": 1, "c": 3}}, {"a": {"c": 2}}),
        ({"a": {"b": 1}}, {"a": {"b": 1, "extra": 9}}, {}),
        ({"a": {"b": {"c": 1}}}, {"a": {"b": {"c": 2}}}, {"a": {"b": {"c": 1}}}),
        ({"a": {"b": 1, "e": {}}}, {"a": 5}, {"a": {"b": 1}}),
        ({"a": {"b": 1}}, {"a": [1]}, {"a": {"b": 1}}),
        ({"a": {"b": 1}}, {}, {"a": {"b": 1}}),
        ({"a": {}}, {}, {}),
        ({"a": {"b": {}}}, {"a": 1}, {}),
        ({"a": 1}, {"a": {"b": 1}}, {"a": 1}),
        ({"a": [1]}, {"a": {"0": 1}}, {"a": [1]}),
        ({"a": "x", "b": "y"}, {"a": "x", "b": "z"}, {"b": "y"}),
    ],
)
def test_compute_delta(desired: Document, reported: Document, expected: Document) -> None:
    assert compute_delta(desired, reported) == expected
    assert has_delta(desired, reported) is bool(expected)


def test_realistic_lamp() -> None:
    desired: Document = {
        "power": True,
        "brightness": 80,
        "dimming_schedule": [{"at": "22:00", "level": 40}],
    }
    reported: Document = {
        "power": True,
        "brightness": 60,
        "dimming_schedule": [{"at": "22:00", "level": 40}],
        "energy": {"total_wh": 1200.5},
        "firmware": {"version": "2.1.0"},
    }
    assert compute_delta(desired, reported) == {"brightness": 80}


def test_inputs_not_mutated_and_result_not_aliased() -> None:
    desired: Document = {"a": {"b": [1, 2]}, "c": {"d": {"e": 1}}}
    reported: Document = {"a": 1}
    before = copy.deepcopy((desired, reported))
    delta: Any = compute_delta(desired, reported)
    delta["a"]["b"].append(3)
    delta["c"]["d"]["e"] = 2
    assert (desired, reported) == before


@pytest.mark.parametrize("seed", range(20))
def test_delta_properties(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(100):
        desired = random_document(rng, 0, nulls=False)
        reported = random_document(rng, 0, nulls=False)
        delta = compute_delta(desired, reported)
        assert has_delta(desired, reported) is bool(delta)
        # Reporting the delta settles it: the device then has what was desired.
        settled = apply_merge_patch(reported, delta)
        assert compute_delta(desired, settled) == {}
        assert not has_delta(desired, settled)
        assert compute_delta(desired, desired) == {}
