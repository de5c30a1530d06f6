"""Semantic versions: parsing, SemVer precedence, downgrade and upgrade-path refusals."""

from __future__ import annotations

import random
from itertools import pairwise

import pytest

from firmware_ota.versions import (
    MAX_VERSION_LENGTH,
    Version,
    downgrade_refusal,
    parse_version,
    upgrade_path_refusal,
)
from twin.errors import InvalidArgument

# Strictly increasing precedence: the example list of semver.org 2.0 (section 11) and more.
ASCENDING = [
    "0.0.0",
    "0.0.1",
    "0.1.0",
    "0.9.99",
    "1.0.0-0",
    "1.0.0-0.0",
    "1.0.0-1",
    "1.0.0-2",
    "1.0.0-10",
    "1.0.0-alpha",
    "1.0.0-alpha.1",
    "1.0.0-alpha.beta",
    "1.0.0-beta",
    "1.0.0-beta.2",
    "1.0.0-beta.11",
    "1.0.0-rc.1",
    "1.0.0",
    "1.0.1",
    "1.2.0",
    "1.10.0",
    "2.0.0",
    "2.1.0-rc.1",
    "2.1.0",
    "10.0.0",
]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2.1.0", Version(2, 1, 0)),
        ("0.0.0", Version(0, 0, 0)),
        ("2.1.0+7", Version(2, 1, 0, build=("7",))),
        ("1.0.0-rc.1", Version(1, 0, 0, prerelease=("rc", "1"))),
        ("1.0.0-x-y.0a+build.007", Version(1, 0, 0, ("x-y", "0a"), ("build", "007"))),
        ("123456789.0.1", Version(123456789, 0, 1)),
    ],
)
def test_parse(text: str, expected: Version) -> None:
    version = parse_version(text)
    assert version == expected
    assert version.build == expected.build
    assert str(version) == text


@pytest.mark.parametrize(
    "text",
    [
        "",
        "2",
        "2.1",
        "v2.1.0",
        "2.1.0.0",
        "02.1.0",
        "2.01.0",
        "2.1.00",
        "-1.0.0",
        "1.0.0-",
        "1.0.0+",
        "1.0.0-01",
        "1.0.0-rc..1",
        "1.0.0-rc_1",
        "1.0.0+7+8",
        " 1.0.0",
        "1.0.0 ",
        "1.0.0\n",
        "١.0.0",
        "1.0.0-é",
    ],
)
def test_parse_rejects(text: str) -> None:
    with pytest.raises(InvalidArgument, match=r"^version: .*not a semantic version"):
        parse_version(text)


def test_parse_names_the_field_and_bounds_the_length() -> None:
    with pytest.raises(InvalidArgument, match=r"^target version: '2\.x'"):
        parse_version("2.x", name="target version")
    longest = "1.0.0-" + "a" * (MAX_VERSION_LENGTH - len("1.0.0-"))
    assert str(parse_version(longest)) == longest
    with pytest.raises(InvalidArgument, match="longer than"):
        parse_version(longest + "a")


def test_precedence() -> None:
    versions = [parse_version(text) for text in ASCENDING]
    for lower, higher in pairwise(versions):
        assert lower < higher
        assert lower <= higher
        assert higher > lower
        assert higher >= lower
        assert lower != higher
    shuffled = versions[:]
    random.Random(7).shuffle(shuffled)
    assert [str(v) for v in sorted(shuffled)] == ASCENDING


def test_build_metadata_is_ignored_in_ordering_and_equality() -> None:
    a, b = parse_version("2.1.0+7"), parse_version("2.1.0+8")
    assert a == b
    assert hash(a) == hash(b)
    assert a <= b
    assert a >= b
    assert not a < b
    assert not a > b
    assert str(a) != str(b)
    assert parse_version("2.1.0-rc.1+99") < parse_version("2.1.0+1")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"major": -1, "minor": 0, "patch": 0},
        {"major": 1, "minor": True, "patch": 0},
        {"major": 1, "minor": 0, "patch": 0, "prerelease": ("01",)},
        {"major": 1, "minor": 0, "patch": 0, "prerelease": ("",)},
        {"major": 1, "minor": 0, "patch": 0, "build": ("a.b",)},
    ],
)
def test_constructor_checks_parts(kwargs: dict[str, object]) -> None:
    with pytest.raises(InvalidArgument):
        Version(**kwargs)  # type: ignore[arg-type]


# (current, current counter, target, target counter, allow_downgrade, refusal pattern or None)
DOWNGRADE_CASES: list[tuple[str | None, int | None, str, int | None, bool, str | None]] = [
    # Upgrades and same version.
    ("2.0.0", None, "2.1.0", None, False, None),
    ("2.1.0-rc.1", None, "2.1.0", None, False, None),
    ("2.1.0", None, "2.1.0", None, False, None),
    ("2.1.0+7", None, "2.1.0+6", None, False, None),
    # Lower versions.
    ("2.1.0", None, "2.0.9", None, False, "lower than the running 2.1.0"),
    ("2.1.0", None, "2.1.0-rc.1", None, False, "lower"),
    ("2.1.0", None, "2.0.9", None, True, None),
    # Unknown or unparseable running version.
    (None, None, "2.1.0", None, False, "has not reported"),
    ("", None, "2.1.0", None, False, "has not reported"),
    ("lamp-fw-7", None, "2.1.0", None, False, "'lamp-fw-7' is not semantic"),
    (None, None, "2.1.0", None, True, None),
    ("lamp-fw-7", None, "2.1.0", None, True, None),
    # Security counters: never down, not even with allow_downgrade.
    ("2.0.0", 3, "2.1.0", 3, False, None),
    ("2.0.0", 3, "2.1.0", 4, False, None),
    ("2.0.0", 3, "2.1.0", 2, False, "from 3 to 2"),
    ("2.1.0", 3, "2.0.0", 2, True, "from 3 to 2"),
    ("2.1.0", 3, "2.0.0", 3, True, None),
    # An image without a counter counts as 0.
    ("2.0.0", 1, "2.1.0", None, True, "from 1 to 0"),
    ("2.0.0", 0, "2.1.0", None, False, None),
    # A device that reports no counter is not checked.
    ("2.0.0", None, "2.1.0", 0, False, None),
    # The counter is checked before the version.
    (None, 5, "2.1.0", 1, True, "security counter"),
]


@pytest.mark.parametrize(
    ("current", "current_counter", "target", "target_counter", "allow", "refusal"),
    DOWNGRADE_CASES,
)
def test_downgrade_refusal(
    current: str | None,
    current_counter: int | None,
    target: str,
    target_counter: int | None,
    allow: bool,
    refusal: str | None,
) -> None:
    reason = downgrade_refusal(current, current_counter, target, target_counter, allow)
    if refusal is None:
        assert reason is None
    else:
        assert reason is not None
        assert refusal in reason


def test_downgrade_refusal_bounds_a_long_reported_version() -> None:
    reason = downgrade_refusal("x" * 10_000, None, "2.1.0", None, False)
    assert reason is not None
    assert len(reason) < 2 * MAX_VERSION_LENGTH + 100


def test_downgrade_refusal_rejects_a_bad_target() -> None:
    with pytest.raises(InvalidArgument, match=r"^target version: 'latest'"):
        downgrade_refusal("2.0.0", None, "latest", None, True)
    with pytest.raises(InvalidArgument, match=r"^target security counter"):
        downgrade_refusal("2.0.0", None, "2.1.0", -1, True)


@pytest.mark.parametrize(
    ("current", "minimum", "refusal"),
    [
        ("1.0.0", None, None),
        ("1.0.0", "", None),
        (None, None, None),
        ("2.0.0", "2.0.0", None),
        ("2.0.0+3", "2.0.0+9", None),
        ("2.5.1", "2.0.0", None),
        ("1.9.9", "2.0.0", "older than 2.0.0"),
        ("2.0.0-rc.1", "2.0.0", "older"),
        (None, "2.0.0", "has not reported"),
        ("garbage", "2.0.0", "not semantic"),
    ],
)
def test_upgrade_path_refusal(
    current: str | None, minimum: str | None, refusal: str | None
) -> None:
    reason = upgrade_path_refusal(current, minimum)
    if refusal is None:
        assert reason is None
    else:
        assert reason is not None
        assert refusal in reason


def test_upgrade_path_refusal_rejects_a_bad_minimum() -> None:
    with pytest.raises(InvalidArgument, match=r"^minimum from version: '2\.0'"):
        upgrade_path_refusal("2.1.0", "2.0")
