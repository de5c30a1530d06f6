"""Opaque page tokens for List/Query calls (keyset pagination on device id).

A token remembers the last id of the previous page and a fingerprint of the filter, so a
token reused with another filter is refused instead of silently paging something else.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable, Sequence
from typing import TypeVar

from twin.errors import InvalidArgument

Row = TypeVar("Row")

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000


def page_size(requested: int) -> int:
    """The page size to use for a requested one (0 means the default; capped)."""
    if requested < 0:
        raise InvalidArgument("page_size must not be negative")
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def _fingerprint(filter_text: str) -> str:
    return hashlib.sha256(filter_text.encode()).hexdigest()[:16]


def encode_page_token(after_id: str, filter_text: str) -> str:
    """A token continuing after `after_id` for the same filter."""
    raw = json.dumps({"a": after_id, "f": _fingerprint(filter_text)}).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_page_token(token: str, filter_text: str) -> str:
    """The id to continue after ("" for the first page); InvalidArgument if the token is bad."""
    if not token:
        return ""
    try:
        data = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        after, fingerprint = data["a"], data["f"]
    except (ValueError, KeyError, TypeError):
        raise InvalidArgument("page_token is malformed") from None
    if not isinstance(after, str) or fingerprint != _fingerprint(filter_text):
        raise InvalidArgument("page_token does not belong to this filter")
    return after


def decode_numeric_page_token(token: str, filter_text: str) -> int | None:
    """Like `decode_page_token` for lists keyed on a numeric id (None for the first page)."""
    after = decode_page_token(token, filter_text)
    if not after:
        return None
    if not after.isdigit():
        raise InvalidArgument("page_token is malformed")
    return int(after)


def split_page(
    rows: Sequence[Row], size: int, key: Callable[[Row], str], filter_text: str
) -> tuple[list[Row], str]:
    """The page in `rows`, read with a limit of `size` + 1 (the one more tells whether a next
    page exists), and the token continuing after its last row, `key` being what the next read
    continues after ("" when this is the last page)."""
    page = list(rows[:size])
    more = len(rows) > size
    return page, encode_page_token(key(page[-1]), filter_text) if more else ""
