"""Page tokens and splitting a page off a read of size + 1 rows."""

from __future__ import annotations

import pytest

from twin.errors import InvalidArgument
from twin.page_tokens import decode_page_token, split_page


def test_a_read_of_one_more_row_tells_whether_a_next_page_exists() -> None:
    rows = ["a", "b", "c"]
    page, token = split_page(rows, 2, str.upper, "kind=lamp")
    assert page == ["a", "b"]
    assert decode_page_token(token, "kind=lamp") == "B"
    with pytest.raises(InvalidArgument, match="filter"):
        decode_page_token(token, "kind=sensor")
    assert split_page(rows, 3, str.upper, "kind=lamp") == (rows, "")
    assert split_page([], 3, str.upper, "kind=lamp") == ([], "")
