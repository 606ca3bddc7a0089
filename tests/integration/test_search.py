"""Finding rows by task id or argument value (``outbox.admin.search``), on every database:
JSONB containment on PostgreSQL, JSON_TABLE on MariaDB, json_each on SQLite."""

from __future__ import annotations

import uuid

import pytest
from celery import Celery
from sqlalchemy import Engine, update

from outbox import OutboxStatus, TaskOutbox, outbox_table
from outbox.admin.search import find_tasks, latest_dead, parse_search
from tests.search_cases import CASES, enqueue_rows


@pytest.fixture
def task_ids(store_engine: Engine, celery_app: Celery) -> dict[str, str]:
    return enqueue_rows(store_engine, TaskOutbox(celery_app), "orders.notify_customer")


@pytest.mark.parametrize(("text", "expected"), CASES)
def test_an_argument_value_finds_the_rows_with_an_equal_argument(
    store_engine: Engine, task_ids: dict[str, str], text: str, expected: set[str]
) -> None:
    """Positional args and keyword values are compared whole, text exactly (case and all);
    numbers match numeric text; nested values and substrings do not match."""
    found = {str(row.task_id) for row in find_tasks(store_engine, parse_search(text))}
    assert {task_ids[label] for label in expected} == found


def test_text_is_compared_exactly(store_engine: Engine, task_ids: dict[str, str]) -> None:
    """Not by a case-insensitive collation (MariaDB's default)."""
    assert [] == find_tasks(store_engine, parse_search("ADA@example.com"))


def test_a_task_id_finds_that_row_alone(store_engine: Engine, task_ids: dict[str, str]) -> None:
    """A UUID that is a task id returns its row, even in upper case."""
    rows = find_tasks(store_engine, parse_search(f"  {task_ids['email'].upper()} "))
    assert [task_ids["email"]] == [str(row.task_id) for row in rows]


def test_results_are_newest_first_and_bounded(
    store_engine: Engine, task_ids: dict[str, str]
) -> None:
    """The limit keeps the newest matches."""
    rows = find_tasks(store_engine, parse_search("42"), limit=2)
    assert [task_ids["real"], task_ids["kwarg"]] == [str(row.task_id) for row in rows]


def test_latest_dead_lists_only_dead_rows_newest_first(
    store_engine: Engine, task_ids: dict[str, str]
) -> None:
    """Dead rows, most recently enqueued first."""
    dead = [uuid.UUID(task_ids[label]) for label in ("int", "email")]
    with store_engine.begin() as conn:
        conn.execute(
            update(outbox_table)
            .where(outbox_table.c.task_id.in_(dead))
            .values(status=OutboxStatus.DEAD)
        )
    found = [str(row.task_id) for row in latest_dead(store_engine)]
    assert [task_ids["email"], task_ids["int"]] == found
    assert 1 == len(latest_dead(store_engine, limit=1))
