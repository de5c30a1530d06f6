"""One-time enrollment codes that an installer creates for a device and types into it.

A code is 16 symbols of Crockford base32 shown in groups of four, e.g. `7KQ2-M9XD-4HTR-B0VW`.
Each symbol carries 5 bits, so a code holds 80 bits from `secrets`: far beyond guessing within
its short life. The alphabet leaves out I, L, O and U so that nothing is ambiguous when read
aloud or from a small screen; what people type anyway (lower case, spaces, O for 0, I or L
for 1) is normalized back. The service keeps only `hash_code` of a code, bound to the device's
serial number, plus an `EnrollmentWindow` saying until when, and whether, it may be used.

Pure functions and plain data: storage, rate limiting and the EST path live elsewhere.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from twin.errors import InvalidArgument

# Crockford base32: digits and letters without I, L, O (look like 1, 1, 0) and U (avoids
# accidental words). 32 symbols, so each one is exactly 5 bits of entropy.
ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
BITS_PER_SYMBOL = 5

# 16 symbols = 80 bits: an online guesser limited to a few attempts per minute has no chance
# within the code's lifetime, yet four groups of four are still quick to type on site.
CODE_SYMBOLS = 16
GROUP_SIZE = 4
SEPARATOR = "-"

MIN_TTL_SECONDS = 60
MAX_TTL_SECONDS = 30 * 24 * 3600

# Prefix of the hashed text, so these hashes can never be confused with another use of SHA-256
# over similar strings in the service.
_HASH_CONTEXT = "citytwin-enrollment"

# Every character a person may type for a symbol -> the canonical symbol. Built once: lower
# case, and Crockford's decoding of the look-alikes (O -> 0, I and L -> 1). U stays refused:
# Crockford reserves it, and accepting it would make a typo silently match some other code.
_TYPED: dict[str, str] = {
    **{c: c for c in ALPHABET},
    **{c.lower(): c for c in ALPHABET},
    **{c: "0" for c in "Oo"},
    **{c: "1" for c in "IiLl"},
}

_ALLOWED_TEXT = "use 0-9 and A-Z except U"


def new_code(groups: int = CODE_SYMBOLS // GROUP_SIZE, group_size: int = GROUP_SIZE) -> str:
    """A fresh random code of `groups` groups of `group_size` symbols, joined by hyphens.

    Entropy is 5 bits per symbol: the default 4 x 4 gives 80 bits. The symbols come from
    `secrets`, the OS's cryptographic random source.
    """
    if groups < 1 or group_size < 1:
        raise ValueError("groups and group_size must be at least 1")
    return SEPARATOR.join(
        "".join(secrets.choice(ALPHABET) for _ in range(group_size)) for _ in range(groups)
    )


def normalize_code(text: str, *, symbols: int = CODE_SYMBOLS) -> str:
    """The canonical form (`XXXX-XXXX-...`, upper case) of a code as a person typed it.

    Whitespace and hyphens anywhere are ignored, lower case is accepted, and O, I, L are read
    as 0, 1, 1. Raises `InvalidArgument` for any other character or when the number of symbols
    is not `symbols`. The message gives a position or a count, never the code itself: it is a
    secret and messages end up in logs.
    """
    if symbols < 1:
        raise ValueError("symbols must be at least 1")
    canonical: list[str] = []
    for ch in text:
        if ch.isspace() or ch == SEPARATOR:
            continue
        symbol = _TYPED.get(ch)
        if symbol is None:
            raise InvalidArgument(
                f"enrollment code symbol {len(canonical) + 1} is not allowed; {_ALLOWED_TEXT}"
            )
        canonical.append(symbol)
        if len(canonical) > symbols:
            # Stop early: no need to walk an arbitrarily long input to know it is wrong.
            raise InvalidArgument(f"enrollment code is too long; expected {symbols} symbols")
    if len(canonical) != symbols:
        raise InvalidArgument(f"enrollment code has {len(canonical)} symbols; expected {symbols}")
    return SEPARATOR.join(
        "".join(canonical[i : i + GROUP_SIZE]) for i in range(0, symbols, GROUP_SIZE)
    )


def hash_code(code: str, serial_number: str, *, symbols: int = CODE_SYMBOLS) -> str:
    """The SHA-256 hex digest under which the code for device `serial_number` is stored.

    The code is normalized first (`InvalidArgument` if malformed), so any way of typing it
    gives the same hash. An empty serial number is refused with `InvalidArgument`.
    """
    if not serial_number:
        raise InvalidArgument("serial number must not be empty")
    canonical = normalize_code(code, symbols=symbols)
    # A fast, unkeyed hash is enough here, unlike for passwords: the code has 80 bits of
    # entropy from `secrets` (no dictionary to try), works once, expires within days at most,
    # and online attempts are rate-limited, so even a leaked hash table cannot be brute-forced
    # in time. Binding the serial number into the hashed text means a code only works for the
    # device it was created for: a code read off one installer's sheet cannot enroll another
    # device, and equal codes for two devices (however unlikely) give different hashes. The
    # code comes last and contains no ':', so no serial can make two inputs collide.
    text = f"{_HASH_CONTEXT}:{serial_number}:{canonical}"
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def codes_match(
    stored_hash: str, code: str, serial_number: str, *, symbols: int = CODE_SYMBOLS
) -> bool:
    """True if `code`, typed for device `serial_number`, is the one stored as `stored_hash`.

    Malformed input (a code that does not normalize, an empty serial, a stored hash that is
    not what `hash_code` gives) is simply no match, never an exception: to the caller it is
    the same failed attempt. The comparison takes constant time.
    """
    try:
        candidate = hash_code(code, serial_number, symbols=symbols)
    except InvalidArgument:
        return False
    # Compare bytes: `compare_digest` raises TypeError on non-ASCII str, and a garbage stored
    # value must give False. "replace" keeps even lone surrogates from raising.
    return hmac.compare_digest(stored_hash.encode("utf-8", "replace"), candidate.encode("ascii"))


def _require_aware(name: str, value: datetime) -> None:
    # Naive datetimes compared with aware ones raise, and naive ones alone silently mean
    # "local time of whichever host": both are bugs, so refuse them where they enter.
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} must be timezone-aware")


@dataclass(frozen=True)
class EnrollmentWindow:
    """When a code was created and expires, and whether it has been used or cancelled.

    All datetimes must be timezone-aware, and `expires_at` must come after `created_at`
    (`ValueError` otherwise: these come from code, not from callers).
    """

    created_at: datetime
    expires_at: datetime
    used_at: datetime | None = None
    cancelled_at: datetime | None = None

    def __post_init__(self) -> None:
        _require_aware("created_at", self.created_at)
        _require_aware("expires_at", self.expires_at)
        if self.used_at is not None:
            _require_aware("used_at", self.used_at)
        if self.cancelled_at is not None:
            _require_aware("cancelled_at", self.cancelled_at)
        if self.expires_at <= self.created_at:
            raise ValueError("expires_at must be after created_at")


def usable(window: EnrollmentWindow, now: datetime) -> str | None:
    """None if a code with this window may be used at `now`, else why not.

    Reasons, checked in this order: "used" (the most telling: a second attempt may mean the
    code leaked), "cancelled", "expired" (at or after `expires_at`). `now` must be aware.
    """
    _require_aware("now", now)
    if window.used_at is not None:
        return "used"
    if window.cancelled_at is not None:
        return "cancelled"
    if now >= window.expires_at:
        return "expired"
    return None


def expiry(now: datetime, ttl_seconds: int) -> datetime:
    """When a code created at `now` with a lifetime of `ttl_seconds` expires.

    The lifetime must be from 60 seconds to 30 days (`InvalidArgument` otherwise): shorter
    cannot be typed in time, longer leaves a live credential lying around. `now` must be
    timezone-aware (`ValueError`).
    """
    _require_aware("now", now)
    if not MIN_TTL_SECONDS <= ttl_seconds <= MAX_TTL_SECONDS:
        raise InvalidArgument(
            f"enrollment code lifetime must be from {MIN_TTL_SECONDS} seconds to 30 days; "
            f"got {ttl_seconds} seconds"
        )
    return now + timedelta(seconds=ttl_seconds)
