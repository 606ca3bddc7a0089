"""Reading a search text (``outbox.admin.search``); the searches themselves run on every
database in tests/integration/test_search.py."""

from __future__ import annotations

import pytest

from outbox.admin.search import MAX_SEARCH_LENGTH, parse_search
from outbox.errors import InvalidSearchError


def test_numeric_text_also_searches_for_the_number() -> None:
    """``42`` stands for the text, the integer and a Decimal; huge or odd numbers too."""
    assert ("42", 42) == parse_search("42").values[:2]
    assert ("1e400",) == parse_search("1e400").values
    assert 10**30 in parse_search(str(10**30)).values
    assert ("007", 7) == parse_search("007").values[:2]
    assert ("1_000",) == parse_search("1_000").values


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("   ", "the search is empty"),
        ("x" * (MAX_SEARCH_LENGTH + 1), f"of at most {MAX_SEARCH_LENGTH}"),
        ("42\x00", "contains control characters"),
        ("a\nb", "contains control characters"),
    ],
)
def test_unsearchable_text_is_refused_with_a_reason(text: str, message: str) -> None:
    """Empty, overlong or control-character text raises InvalidSearchError saying why."""
    with pytest.raises(InvalidSearchError, match=message):
        parse_search(text)
