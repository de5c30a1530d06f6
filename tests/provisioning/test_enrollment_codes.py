"""Enrollment codes: format, randomness, typing variants, hashing, windows and expiry."""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from datetime import UTC, datetime, timedelta, timezone

import pytest

from provisioning.enrollment_codes import (
    ALPHABET,
    EnrollmentWindow,
    codes_match,
    expiry,
    hash_code,
    new_code,
    normalize_code,
    usable,
)
from twin.errors import InvalidArgument

CODE = "7KQ2-M9XD-4HTR-B0VW"
SERIAL = "HW-123"
NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)

CODE_RE = re.compile(r"^[0-9A-HJKMNP-TV-Z]{4}(-[0-9A-HJKMNP-TV-Z]{4}){3}$")


# --- new_code -------------------------------------------------------------------------------


def test_alphabet_is_crockford_base32() -> None:
    assert len(ALPHABET) == 32
    assert len(set(ALPHABET)) == 32
    assert not set("ILOU") & set(ALPHABET)


def test_new_code_format() -> None:
    code = new_code()
    assert CODE_RE.match(code), code
    assert normalize_code(code) == code


def test_new_code_custom_shape() -> None:
    code = new_code(groups=3, group_size=5)
    assert [len(g) for g in code.split("-")] == [5, 5, 5]
    assert set(code.replace("-", "")) <= set(ALPHABET)


@pytest.mark.parametrize(("groups", "group_size"), [(0, 4), (4, 0), (-1, 4)])
def test_new_code_refuses_empty_shapes(groups: int, group_size: int) -> None:
    with pytest.raises(ValueError):
        new_code(groups, group_size)


def test_thousand_codes_are_unique() -> None:
    codes = [new_code() for _ in range(1000)]
    assert len(set(codes)) == 1000


def test_symbol_distribution_is_sane() -> None:
    # 16,000 symbols over 32 values: ~500 each with a standard deviation of ~22. Every symbol
    # must appear, and none may be wildly off (bounds are >6 sigma, so no flakiness).
    counts = Counter("".join(new_code() for _ in range(1000)).replace("-", ""))
    assert set(counts) == set(ALPHABET)
    assert all(350 < n < 650 for n in counts.values()), counts


# --- normalize_code -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "typed",
    [
        "7KQ2-M9XD-4HTR-B0VW",
        "7kq2-m9xd-4htr-b0vw",
        "7KQ2M9XD4HTRB0VW",
        "  7KQ2 M9XD 4HTR B0VW \n",
        "7kq2 - m9xd - 4htr - b0vw",
        "7KQ2-M9XD-4HTR-BOVW",  # letter O for zero
        "7KQ2-M9XD-4HTR-BovW",
        "7-K-Q-2-M-9-X-D-4-H-T-R-B-0-V-W",
    ],
)
def test_normalize_typed_variants(typed: str) -> None:
    assert normalize_code(typed) == CODE


@pytest.mark.parametrize("one", ["1", "I", "i", "L", "l"])
def test_normalize_maps_one_look_alikes(one: str) -> None:
    assert normalize_code(f"{one}AAA-BBBB-CCCC-DDDD") == "1AAA-BBBB-CCCC-DDDD"


def test_normalize_other_lengths() -> None:
    assert normalize_code("abcd efgh", symbols=8) == "ABCD-EFGH"
    assert normalize_code("abcdefghjk", symbols=10) == "ABCD-EFGH-JK"


@pytest.mark.parametrize(
    ("typed", "message"),
    [
        ("7KQ2-M9XD-4HTR-B0V", "has 15 symbols; expected 16"),
        ("7KQ2-M9XD-4HTR-B0VWX", "too long"),
        ("", "has 0 symbols"),
        ("  - - ", "has 0 symbols"),
        ("7KQ2-M9XD-4HTR-B0VU", "symbol 16 is not allowed"),
        ("U", "symbol 1 is not allowed"),
        ("7KQ2.M9XD-4HTR-B0VW", "symbol 5 is not allowed"),
        ("7KQ2_M9XD_4HTR_B0VW", "not allowed"),
        ("7KQ2-M9XD-4HTR-B0V!", "not allowed"),
        ("7KQ2-M9XD-4HTR-B0VÅ", "not allowed"),
        ("７KQ2-M9XD-4HTR-B0VW", "not allowed"),  # full-width digit
    ],
)
def test_normalize_refusals(typed: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        normalize_code(typed)


def test_refusal_does_not_echo_the_code() -> None:
    with pytest.raises(InvalidArgument) as info:
        normalize_code("7KQ2-M9XD-4HTR-B0V!")
    assert "7KQ2" not in str(info.value)
    assert "!" not in str(info.value)


def test_very_long_input_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="too long"):
        normalize_code("A" * 1_000_000)


# --- hash_code and codes_match --------------------------------------------------------------


def test_hash_is_sha256_of_context_serial_and_canonical_code() -> None:
    expected = hashlib.sha256(f"citytwin-enrollment:{SERIAL}:{CODE}".encode()).hexdigest()
    assert hash_code(CODE, SERIAL) == expected
    assert hash_code("7kq2m9xd4htrbovw", SERIAL) == expected


def test_hash_refuses_malformed_input() -> None:
    with pytest.raises(InvalidArgument):
        hash_code("7KQ2", SERIAL)
    with pytest.raises(InvalidArgument, match="serial"):
        hash_code(CODE, "")


def test_codes_match_typed_variants() -> None:
    stored = hash_code(CODE, SERIAL)
    assert codes_match(stored, CODE, SERIAL)
    assert codes_match(stored, " 7kq2 m9xd 4htr bovw ", SERIAL)


def test_hash_binds_the_serial() -> None:
    stored = hash_code(CODE, SERIAL)
    assert hash_code(CODE, "HW-124") != stored
    assert not codes_match(stored, CODE, "HW-124")
    assert not codes_match(stored, CODE, "hw-123")


def test_other_code_does_not_match() -> None:
    stored = hash_code(CODE, SERIAL)
    assert not codes_match(stored, "7KQ2-M9XD-4HTR-B0VX", SERIAL)


@pytest.mark.parametrize(
    ("stored", "code", "serial"),
    [
        ("", CODE, SERIAL),
        ("not-a-hash", CODE, SERIAL),
        ("é" * 64, CODE, SERIAL),
        ("\ud800" * 64, CODE, SERIAL),
        ("0" * 64, CODE, SERIAL),
        (None, "7KQ2", SERIAL),  # replaced below by the real hash
        (None, "", SERIAL),
        (None, "7KQ2-M9XD-4HTR-B0VU", SERIAL),
        (None, "💡" * 16, SERIAL),
        (None, CODE, ""),
    ],
)
def test_codes_match_garbage_is_false(stored: str | None, code: str, serial: str) -> None:
    if stored is None:
        stored = hash_code(CODE, SERIAL)
    assert codes_match(stored, code, serial) is False


def test_codes_match_upper_case_stored_hash_is_no_match() -> None:
    # Stored hashes are exactly what hash_code returned; anything else is not accepted.
    assert not codes_match(hash_code(CODE, SERIAL).upper(), CODE, SERIAL)


# --- EnrollmentWindow and usable ------------------------------------------------------------


def window(**changes: datetime | None) -> EnrollmentWindow:
    fields: dict[str, datetime | None] = {
        "created_at": NOW,
        "expires_at": NOW + timedelta(hours=1),
        **changes,
    }
    return EnrollmentWindow(**fields)  # type: ignore[arg-type]


def test_fresh_window_is_usable() -> None:
    assert usable(window(), NOW) is None
    assert usable(window(), NOW + timedelta(minutes=59, seconds=59)) is None


def test_window_expires_at_expires_at() -> None:
    assert usable(window(), NOW + timedelta(hours=1)) == "expired"
    assert usable(window(), NOW + timedelta(days=3)) == "expired"


def test_used_window() -> None:
    assert usable(window(used_at=NOW + timedelta(minutes=5)), NOW + timedelta(minutes=6)) == "used"


def test_cancelled_window() -> None:
    w = window(cancelled_at=NOW + timedelta(minutes=5))
    assert usable(w, NOW + timedelta(minutes=6)) == "cancelled"


def test_reason_precedence() -> None:
    late = NOW + timedelta(days=1)
    both = window(used_at=NOW, cancelled_at=NOW)
    assert usable(both, late) == "used"
    assert usable(window(cancelled_at=NOW), late) == "cancelled"


def test_window_works_across_time_zones() -> None:
    # 14:30 at UTC+2 is 12:30 UTC: inside the window that runs 12:00-13:00 UTC.
    plus_two = datetime(2025, 3, 1, 14, 30, tzinfo=timezone(timedelta(hours=2)))
    assert usable(window(), plus_two) is None
    assert usable(window(), plus_two + timedelta(minutes=30)) == "expired"


def test_window_refuses_naive_and_inverted_times() -> None:
    naive = datetime(2025, 3, 1, 12, 0)
    with pytest.raises(ValueError, match="aware"):
        window(created_at=naive)
    with pytest.raises(ValueError, match="aware"):
        window(used_at=naive)
    with pytest.raises(ValueError, match="after"):
        window(expires_at=NOW)
    with pytest.raises(ValueError, match="aware"):
        usable(window(), naive)


# --- expiry ---------------------------------------------------------------------------------


@pytest.mark.parametrize("ttl", [60, 3600, 30 * 24 * 3600])
def test_expiry_within_bounds(ttl: int) -> None:
    assert expiry(NOW, ttl) == NOW + timedelta(seconds=ttl)


@pytest.mark.parametrize("ttl", [-1, 0, 59, 30 * 24 * 3600 + 1, 10**9])
def test_expiry_out_of_bounds(ttl: int) -> None:
    with pytest.raises(InvalidArgument, match="lifetime"):
        expiry(NOW, ttl)


def test_expiry_requires_aware_now() -> None:
    with pytest.raises(ValueError, match="aware"):
        expiry(datetime(2025, 3, 1, 12, 0), 3600)
