"""JSON Merge Patch, effective patches and the checks on incoming patches."""

from __future__ import annotations

import copy
import json
import math
import random
from typing import Any

import pytest

from twin.errors import InvalidArgument, PayloadTooLarge
from twin.merge_patch import (
    JSON,
    Document,
    apply_merge_patch,
    check_patch,
    effective_patch,
    json_equal,
)

# RFC 7396, appendix A (the cases whose target and patch are objects).
RFC_EXAMPLES: list[tuple[Document, Document, Document]] = [
    ({"a": "b"}, {"a": "c"}, {"a": "c"}),
    ({"a": "b"}, {"b": "c"}, {"a": "b", "b": "c"}),
    ({"a": "b"}, {"a": None}, {}),
    ({"a": "b", "b": "c"}, {"a": None}, {"b": "c"}),
    ({"a": ["b"]}, {"a": "c"}, {"a": "c"}),
    ({"a": "c"}, {"a": ["b"]}, {"a": ["b"]}),
    ({"a": {"b": "c"}}, {"a": {"b": "d", "c": None}}, {"a": {"b": "d"}}),
    ({"a": [{"b": "c"}]}, {"a": [1]}, {"a": [1]}),
    ({"e": None}, {"a": 1}, {"e": None, "a": 1}),
    ({}, {"a": {"bb": {"ccc": None}}}, {"a": {"bb": {}}}),
]


@pytest.mark.parametrize(("target", "patch", "expected"), RFC_EXAMPLES)
def test_rfc_7396_examples(target: Document, patch: Document, expected: Document) -> None:
    assert apply_merge_patch(target, patch) == expected


def test_empty_patch_is_identity() -> None:
    target: Document = {"a": 1, "b": {"c": [1, 2]}}
    assert apply_merge_patch(target, {}) == target


def test_nested_merge_keeps_siblings() -> None:
    target: Document = {"light": {"on": True, "level": 40}, "x": 1}
    assert apply_merge_patch(target, {"light": {"level": 80}}) == {
        "light": {"on": True, "level": 80},
        "x": 1,
    }


def test_object_replacing_scalar_drops_its_nulls() -> None:
    target: Document = {"a": 5}
    patch: Document = {"a": {"b": None, "c": {"d": None, "e": 1}}}
    assert apply_merge_patch(target, patch) == {"a": {"c": {"e": 1}}}


def test_object_replacing_array() -> None:
    assert apply_merge_patch({"a": [1, 2]}, {"a": {"b": 1}}) == {"a": {"b": 1}}


def test_null_for_absent_member_is_harmless() -> None:
    assert apply_merge_patch({"a": 1}, {"b": None}) == {"a": 1}


def test_arrays_inside_patch_keep_nulls_literally() -> None:
    assert apply_merge_patch({}, {"a": [None, {"b": None}]}) == {"a": [None, {"b": None}]}


def test_member_order_kept_and_new_members_appended() -> None:
    result = apply_merge_patch({"a": 1, "b": 2, "c": 3}, {"d": 4, "b": 20})
    assert list(result) == ["a", "b", "c", "d"]


def test_inputs_not_mutated_and_result_shares_nothing() -> None:
    target: Document = {"a": {"b": [1, {"c": 2}]}, "keep": {"k": [1]}}
    patch: Document = {"a": {"x": {"y": [3]}}, "n": [{"m": 1}]}
    target_before = copy.deepcopy(target)
    patch_before = copy.deepcopy(patch)
    result: Any = apply_merge_patch(target, patch)
    assert target == target_before and patch == patch_before
    result["keep"]["k"].append(2)
    result["a"]["x"]["y"].append(4)
    result["n"][0]["m"] = 9
    assert target == target_before and patch == patch_before


# --- json_equal ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b", "equal"),
    [
        (1, 1.0, True),
        (0, -0.0, True),
        (True, 1, False),
        (1, True, False),
        (False, 0, False),
        (True, True, True),
        ("1", 1, False),
        (None, None, True),
        (None, False, False),
        ([1, 2], [1, 2.0], True),
        ([1, 2], [2, 1], False),
        ([1], [1, 1], False),
        ([True], [1], False),
        ({"a": 1}, {"a": 1.0}, True),
        ({"a": 1}, {"a": 1, "b": 2}, False),
        ({"a": True}, {"a": 1}, False),
        ({}, [], False),
        ("x", "x", True),
    ],
)
def test_json_equal(a: JSON, b: JSON, equal: bool) -> None:
    assert json_equal(a, b) is equal
    assert json_equal(b, a) is equal


# --- effective_patch -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "patch", "expected"),
    [
        ({"a": 1}, {"a": 1}, {}),
        ({"a": 1}, {"a": 1.0}, {}),
        ({"a": 1}, {"a": True}, {"a": True}),
        ({"a": True}, {"a": 1}, {"a": 1}),
        ({"a": 1}, {"a": 2}, {"a": 2}),
        ({"a": 1}, {"b": None}, {}),
        ({"a": 1}, {"a": None}, {"a": None}),
        ({"a": [1, 2]}, {"a": [1, 2]}, {}),
        ({"a": [1, 2]}, {"a": [2, 1]}, {"a": [2, 1]}),
        ({"a": {"b": 1, "c": 2}}, {"a": {"b": 1, "c": 3}}, {"a": {"c": 3}}),
        ({"a": {"b": 1}}, {"a": {"b": 1, "z": None}}, {}),
        ({"a": {"b": 1}}, {"a": {}}, {}),
        ({}, {"a": {}}, {"a": {}}),
        ({}, {"a": {"b": None}}, {"a": {}}),
        ({"a": 5}, {"a": {"b": None, "c": 1}}, {"a": {"c": 1}}),
        ({"a": 5}, {"a": {}}, {"a": {}}),
        ({"a": [1]}, {"a": {"x": {"y": None}}}, {"a": {"x": {}}}),
        ({"a": None}, {"a": None}, {"a": None}),
        ({}, {}, {}),
    ],
)
def test_effective_patch_cases(target: Document, patch: Document, expected: Document) -> None:
    assert effective_patch(target, patch) == expected
    assert apply_merge_patch(target, expected) == apply_merge_patch(target, patch)


def test_effective_patch_does_not_mutate_or_alias() -> None:
    target: Document = {"a": {"b": 1}}
    patch: Document = {"a": {"c": [1, 2]}, "d": {"e": None}}
    before = copy.deepcopy((target, patch))
    result: Any = effective_patch(target, patch)
    result["a"]["c"].append(3)
    assert (target, patch) == before


def random_value(rng: random.Random, depth: int, *, nulls: bool) -> JSON:
    """A small random JSON value (shared with the delta and metadata tests)."""
    choices = ["int", "float", "bool", "str", "list"] + (["null"] if nulls else [])
    if depth < 3:
        choices += ["object", "object"]
    kind = rng.choice(choices)
    if kind == "int":
        return rng.randint(-2, 2)
    if kind == "float":
        return rng.choice([0.5, 1.0, 2.0, -0.0])
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "str":
        return rng.choice(["a", "b", "1"])
    if kind == "list":
        return [random_value(rng, 3, nulls=nulls) for _ in range(rng.randint(0, 2))]
    if kind == "null":
        return None
    return random_document(rng, depth + 1, nulls=nulls)


def random_document(rng: random.Random, depth: int, *, nulls: bool) -> Document:
    """A small random object over few keys, so that documents and patches overlap often."""
    keys = rng.sample(["a", "b", "c", "d"], rng.randint(0, 4))
    return {k: random_value(rng, depth, nulls=nulls) for k in keys}


@pytest.mark.parametrize("seed", range(40))
def test_effective_patch_has_the_same_effect(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(100):
        target = random_document(rng, 0, nulls=False)
        # Patches that start from the target hit the "equal value" branches more often.
        patch = random_document(rng, 0, nulls=True)
        if rng.random() < 0.3:
            patch = {**copy.deepcopy(target), **patch}
        applied = apply_merge_patch(target, patch)
        effective = effective_patch(target, patch)
        assert apply_merge_patch(target, effective) == applied
        # Merge patches are idempotent, so a second application changes nothing.
        assert effective_patch(applied, patch) == {}
        assert (effective == {}) == json_equal(applied, target)
        assert effective_patch(target, effective) == effective


# --- check_patch -----------------------------------------------------------------------------


@pytest.mark.parametrize("patch", [[], [1], "x", 1, 1.5, None, True, ("a",)])
def test_check_patch_refuses_non_objects(patch: object) -> None:
    with pytest.raises(InvalidArgument, match="patch must be a JSON object"):
        check_patch(patch)


def test_check_patch_accepts_and_copies() -> None:
    patch = {"a": {"b": [1, "x", None, True]}, "c": None}
    result = check_patch(patch)
    assert result == patch
    assert result is not patch
    assert result["a"] is not patch["a"]


def test_check_patch_accepts_empty_object() -> None:
    assert check_patch({}) == {}


@pytest.mark.parametrize(
    ("patch", "fragment"),
    [
        ({1: 2}, "1"),
        ({"": 1}, "empty"),
        ({"a.b": 1}, "'a.b'"),
        ({"a[0]": 1}, "'a[0]'"),
        ({"x": {"y]": 1}}, "'x'"),
        ({"x": [{"ok": {"b.c": 1}}]}, "x[0].ok"),
        ({"k" * 129: 1}, "129"),
    ],
)
def test_check_patch_refuses_bad_keys(patch: dict[object, object], fragment: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        check_patch(patch)
    assert not isinstance(info.value, PayloadTooLarge)
    assert fragment in str(info.value)


def test_check_patch_key_length_limit_inclusive() -> None:
    assert check_patch({"k" * 128: 1}) == {"k" * 128: 1}


def _nested(depth: int) -> dict[str, object]:
    patch: dict[str, object] = {"leaf": 1}
    for _ in range(depth - 1):
        patch = {"n": patch}
    return patch


def test_check_patch_depth_limit() -> None:
    assert check_patch(_nested(16)) == _nested(16)
    with pytest.raises(PayloadTooLarge, match="16"):
        check_patch(_nested(17))
    assert check_patch(_nested(3), max_depth=3)
    with pytest.raises(PayloadTooLarge, match="deeper than 2"):
        check_patch(_nested(3), max_depth=2)


def test_check_patch_lists_count_towards_depth() -> None:
    assert check_patch({"a": [[1]]}, max_depth=3)
    with pytest.raises(PayloadTooLarge):
        check_patch({"a": [[1]]}, max_depth=2)
    with pytest.raises(PayloadTooLarge):
        check_patch({"a": [[[[[]]]]]}, max_depth=4)


def test_check_patch_very_deep_input_is_refused_without_recursion_error() -> None:
    with pytest.raises(PayloadTooLarge):
        check_patch(_nested(5000))


def test_check_patch_size_limit() -> None:
    patch = {"a": "x" * 10}
    size = len(json.dumps(patch, separators=(",", ":")).encode())
    assert check_patch(patch, max_bytes=size) == patch
    with pytest.raises(PayloadTooLarge) as info:
        check_patch(patch, max_bytes=size - 1)
    assert str(info.value) == f"patch is {size} bytes; the limit is {size - 1}"


def test_check_patch_default_size_limit() -> None:
    check_patch({"a": "x" * 65000})
    with pytest.raises(PayloadTooLarge, match="the limit is 65536"):
        check_patch({"a": "x" * 66000})


def test_check_patch_size_counts_normalised_numbers() -> None:
    # 40.0 becomes 40, so the patch is measured as {"a":40}: 8 bytes.
    assert check_patch({"a": 40.0}, max_bytes=8) == {"a": 40}


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_check_patch_refuses_non_finite_numbers(bad: float) -> None:
    with pytest.raises(InvalidArgument, match=r"'a\.b'"):
        check_patch({"a": {"b": bad}})
    with pytest.raises(InvalidArgument, match=r"'l\[1\]'"):
        check_patch({"l": [1, bad]})


def test_check_patch_normalises_integral_floats() -> None:
    result: Any = check_patch({"a": 40.0, "b": 40.5, "c": [1.0, {"d": -3.0}], "e": -0.0, "f": True})
    assert result == {"a": 40, "b": 40.5, "c": [1, {"d": -3}], "e": 0, "f": True}
    assert type(result["a"]) is int
    assert type(result["b"]) is float
    assert type(result["c"][0]) is int
    assert type(result["c"][1]["d"]) is int
    assert type(result["e"]) is int
    assert result["f"] is True


def test_check_patch_keeps_huge_floats_as_floats() -> None:
    result = check_patch({"a": 1e300, "b": float(2**53), "c": float(2**54)})
    assert type(result["a"]) is float
    assert type(result["b"]) is int
    assert type(result["c"]) is float


def test_check_patch_integer_range() -> None:
    assert check_patch({"a": 2**63 - 1, "b": -(2**63)}) == {"a": 2**63 - 1, "b": -(2**63)}
    with pytest.raises(InvalidArgument, match="64-bit"):
        check_patch({"a": 2**63})
    with pytest.raises(InvalidArgument, match="64-bit"):
        check_patch({"a": [10**5000]})


@pytest.mark.parametrize("bad", [(1, 2), {1, 2}, b"x", object(), 1j])
def test_check_patch_refuses_non_json_values(bad: object) -> None:
    with pytest.raises(InvalidArgument, match="not JSON"):
        check_patch({"a": bad})


def test_check_patch_does_not_mutate_input() -> None:
    patch = {"a": [1.0, {"b": 2.0}]}
    before = copy.deepcopy(patch)
    check_patch(patch)
    assert patch == before
    assert type(patch["a"][0]) is float
