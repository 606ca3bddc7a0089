"""Finding rows by task id or argument value (``outbox.search``) on SQLite."""

from __future__ import annotations

import uuid

import pytest
from celery import Celery
from sqlalchemy import Engine, update

from outbox import OutboxStatus, TaskOutbox, outbox_table
from outbox.errors import InvalidSearchError
from outbox.search import MAX_SEARCH_LENGTH, find_tasks, latest_dead, parse_search
from tests.search_cases import CASES, enqueue_rows


@pytest.fixture
def task_ids(engine: Engine, celery_app: Celery) -> dict[str, str]:
    return enqueue_rows(engine, TaskOutbox(celery_app), "unit.echo")


@pytest.mark.parametrize(("text", "expected"), CASES)
def test_an_argument_value_finds_the_rows_with_an_equal_argument(
    engine: Engine, task_ids: dict[str, str], text: str, expected: set[str]
) -> None:
    """Positional args and keyword values are compared whole; numbers match numeric text."""
    found = {str(row.task_id) for row in find_tasks(engine, parse_search(text))}
    assert {task_ids[label] for label in expected} == found


def test_a_task_id_finds_that_row_alone(engine: Engine, task_ids: dict[str, str]) -> None:
    """A UUID that is a task id returns its row, even in upper case."""
    rows = find_tasks(engine, parse_search(f"  {task_ids['email'].upper()} "))
    assert [task_ids["email"]] == [str(row.task_id) for row in rows]


def test_results_are_newest_first_and_bounded(engine: Engine, task_ids: dict[str, str]) -> None:
    """The limit keeps the newest matches."""
    rows = find_tasks(engine, parse_search("42"), limit=2)
    assert [task_ids["real"], task_ids["kwarg"]] == [str(row.task_id) for row in rows]


def test_latest_dead_lists_only_dead_rows_newest_first(
    engine: Engine, task_ids: dict[str, str]
) -> None:
    """Dead rows, most recently enqueued first."""
    dead = [uuid.UUID(task_ids[label]) for label in ("int", "email")]
    with engine.begin() as conn:
        conn.execute(
            update(outbox_table)
            .where(outbox_table.c.task_id.in_(dead))
            .values(status=OutboxStatus.DEAD)
        )
    assert [task_ids["email"], task_ids["int"]] == [str(row.task_id) for row in latest_dead(engine)]
    assert 1 == len(latest_dead(engine, limit=1))


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
