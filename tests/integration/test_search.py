"""Finding rows by task id or argument value on PostgreSQL (JSONB containment)."""

from __future__ import annotations

import pytest
from celery import Celery
from sqlalchemy import Engine

from outbox import TaskOutbox
from outbox.search import find_tasks, parse_search
from tests.search_cases import CASES, enqueue_rows


@pytest.fixture
def task_ids(engine: Engine, celery_app: Celery) -> dict[str, str]:
    return enqueue_rows(engine, TaskOutbox(celery_app), "orders.notify_customer")


@pytest.mark.parametrize(("text", "expected"), CASES)
def test_an_argument_value_finds_the_rows_with_an_equal_argument(
    engine: Engine, task_ids: dict[str, str], text: str, expected: set[str]
) -> None:
    """The same rows as on SQLite: whole values, numbers matching numeric text."""
    found = {str(row.task_id) for row in find_tasks(engine, parse_search(text))}
    assert {task_ids[label] for label in expected} == found


def test_a_task_id_finds_that_row_alone(engine: Engine, task_ids: dict[str, str]) -> None:
    """A UUID that is a task id returns its row."""
    rows = find_tasks(engine, parse_search(task_ids["email"]))
    assert [task_ids["email"]] == [str(row.task_id) for row in rows]
