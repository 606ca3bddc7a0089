"""`flask outbox retry-dead` revives dead rows, keeping their task ids."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest
from flask import Flask
from sqlalchemy import insert, select

from outbox import OutboxStatus, outbox_table
from webapp.extensions import db


@pytest.fixture
def app(app: Flask) -> Flask:
    """The example app with three dead rows: two of one task, one of another."""
    with app.app_context():
        now = datetime.now(UTC)
        with db.engine.begin() as conn:
            for name in [
                "orders.notify_customer",
                "orders.notify_customer",
                "orders.reserve_stock",
            ]:
                conn.execute(
                    insert(outbox_table).values(
                        task_id=uuid.uuid4(),
                        task_name=name,
                        args=[1],
                        kwargs={},
                        options={},
                        status=OutboxStatus.DEAD,
                        attempts=10,
                        last_error="boom",
                        created_at=now,
                        available_at=now,
                    )
                )
    return app


def rows(app: Flask) -> list[tuple[int, uuid.UUID, str, OutboxStatus, int]]:
    with app.app_context(), db.engine.connect() as conn:
        t = outbox_table.c
        query = select(t.id, t.task_id, t.task_name, t.status, t.attempts).order_by(t.id)
        return [tuple(row) for row in conn.execute(query)]  # type: ignore[misc]


def statuses(app: Flask) -> list[OutboxStatus]:
    return [row[3] for row in rows(app)]


def test_retry_dead_by_task_name_revives_only_that_task(app: Flask) -> None:
    """--task-name narrows the revival; revived rows are pending with attempts reset."""
    before = rows(app)
    result = app.test_cli_runner().invoke(
        args=["outbox", "retry-dead", "--task-name", "orders.notify_customer"]
    )
    assert 0 == result.exit_code, result.output
    assert "2 dead row(s) back to pending" in result.output
    after = rows(app)
    assert [OutboxStatus.PENDING, OutboxStatus.PENDING, OutboxStatus.DEAD] == statuses(app)
    assert [0, 0, 10] == [row[4] for row in after]
    assert [row[1] for row in before] == [row[1] for row in after], "task ids are kept"


def test_retry_dead_by_row_id_and_task_id(app: Flask) -> None:
    """--id takes row ids and task ids, and may be repeated."""
    first, _, third = rows(app)
    result = app.test_cli_runner().invoke(
        args=["outbox", "retry-dead", "--id", str(first[0]), "--id", str(third[1])]
    )
    assert 0 == result.exit_code, result.output
    assert [OutboxStatus.PENDING, OutboxStatus.DEAD, OutboxStatus.PENDING] == statuses(app)


def test_retry_dead_without_filter_revives_all(app: Flask) -> None:
    """With no filter every dead row goes back to pending."""
    app.test_cli_runner().invoke(args=["outbox", "retry-dead"])
    assert [OutboxStatus.PENDING] * 3 == statuses(app)


def test_retry_dead_rejects_a_malformed_id(app: Flask) -> None:
    """An --id that is neither a number nor a UUID is a usage error, and nothing changes."""
    result = app.test_cli_runner().invoke(args=["outbox", "retry-dead", "--id", "nope"])
    assert 2 == result.exit_code
    assert "neither a row id nor a task id" in result.output
    assert [OutboxStatus.DEAD] * 3 == statuses(app)
