"""Rows enqueued into an ORM session keep the session's rules, and a flush inserts them
all with one statement, on every database the outbox supports (``store_engine``)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery
from sqlalchemy import Engine, event, func, select, text
from sqlalchemy.orm import Session

from outbox import OutboxMessage, OutboxSettings, OutboxStatus, TaskOutbox, outbox_table
from outbox.enqueue import EnqueuedTask
from tests.unit.conftest import memory_app

_t = outbox_table.c


@pytest.fixture
def celery_app() -> Celery:
    app = memory_app("session-rows")

    @app.task(name="rows.echo", shared=False)
    def echo(*args: Any) -> Any:
        return args

    return app


@pytest.fixture
def outbox_inserts(store_engine: Engine) -> Iterator[list[str]]:
    """Each INSERT into the outbox table that reaches the driver (an executemany once)."""
    seen: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if statement.lstrip().upper().startswith("INSERT INTO CELERY_OUTBOX "):
            seen.append(statement)

    event.listen(store_engine, "before_cursor_execute", count)
    yield seen
    event.remove(store_engine, "before_cursor_execute", count)


def stored(engine: Engine) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(select(outbox_table).order_by(_t.id)))


def test_a_flush_inserts_every_enqueued_row_with_one_statement(
    store_engine: Engine, celery_app: Celery, outbox_inserts: list[str]
) -> None:
    tasks = TaskOutbox(celery_app)
    with Session(store_engine) as session:
        ids = [tasks.apply_async("rows.echo", [n], session=session).id for n in range(5)]
        assert 5 == len(session.new), "enqueue only adds to the session"
        assert [] == outbox_inserts, "and runs no SQL"
        session.commit()
    assert 1 == len(outbox_inserts)
    got = stored(store_engine)
    assert ids == [str(row.task_id) for row in got]
    assert [[n] for n in range(5)] == [row.args for row in got]
    assert {OutboxStatus.PENDING} == {row.status for row in got}
    assert {0} == {row.deliveries for row in got}, "columns not written take their defaults"


def test_a_flush_of_a_session_with_nothing_else_to_write_inserts_the_rows(
    store_engine: Engine, celery_app: Celery
) -> None:
    """An explicit flush and the autoflush before a query both write the rows, as they
    write any pending object; other connections still see nothing before the commit."""
    tasks = TaskOutbox(celery_app)
    with Session(store_engine) as session:
        tasks.apply_async("rows.echo", [1], session=session)
        session.flush()
        assert not session.new
        in_transaction = "SELECT COUNT(*) FROM celery_outbox"
        assert 1 == session.connection().execute(text(in_transaction)).scalar_one()
        tasks.apply_async("rows.echo", [2], session=session)
        assert 2 == session.scalar(select(func.count()).select_from(OutboxMessage))
        assert [] == stored(store_engine)
        session.commit()
    assert [[1], [2]] == [row.args for row in stored(store_engine)]


def test_a_rolled_back_savepoint_takes_only_its_own_rows(
    store_engine: Engine, celery_app: Celery
) -> None:
    tasks = TaskOutbox(celery_app)
    with Session(store_engine) as session:
        kept = tasks.apply_async("rows.echo", ["before"], session=session).id
        savepoint = session.begin_nested()
        tasks.apply_async("rows.echo", ["inside, flushed"], session=session)
        session.flush()
        tasks.apply_async("rows.echo", ["inside, not flushed"], session=session)
        savepoint.rollback()
        after = tasks.apply_async("rows.echo", ["after"], session=session).id
        session.commit()
    assert [kept, after] == [str(row.task_id) for row in stored(store_engine)]


def test_a_rolled_back_transaction_leaves_no_rows_and_no_notes(
    store_engine: Engine, celery_app: Celery
) -> None:
    tasks = TaskOutbox(celery_app)
    with Session(store_engine) as session:
        for n in range(3):
            tasks.apply_async("rows.echo", [n], session=session)
        session.rollback()
        assert not session.new
        assert not any(key.startswith("celery_outbox") for key in session.info)
        ordered_later = tasks.apply_async("rows.echo", ["next"], session=session).id
        session.commit()
    assert [ordered_later] == [str(row.task_id) for row in stored(store_engine)]


def test_rows_and_other_objects_share_the_flush(
    store_engine: Engine, celery_app: Celery, outbox_inserts: list[str]
) -> None:
    """An object the caller adds beside the enqueued rows is written by the unit of work
    as before; the rows are written once, by the listener, not again by the ORM."""
    tasks = TaskOutbox(celery_app)
    with Session(store_engine) as session:
        tasks.apply_async("rows.echo", [1], session=session)
        by_hand = OutboxMessage(
            task_id=uuid.uuid4(),
            task_name="rows.echo",
            args=[2],
            kwargs={},
            options={},
            status=OutboxStatus.PENDING,
            attempts=0,
            created_at=tasks._clock(),
            available_at=tasks._clock(),
        )
        session.add(by_hand)
        session.commit()
        assert by_hand.id is not None
    assert [[1], [2]] == [row.args for row in stored(store_engine)]
    assert 2 == len(outbox_inserts)


def test_every_value_an_enqueue_records_is_stored(store_engine: Engine, celery_app: Celery) -> None:
    """What the enqueue recorded (its observers' copy) is what the flush wrote: a value
    the statement left out would be lost."""
    tasks = TaskOutbox(celery_app, settings=OutboxSettings(track_lifecycle=True))
    recorded: list[EnqueuedTask] = []
    tasks.observers.append(recorded.append)
    with Session(store_engine) as session:
        tasks.apply_async(
            "rows.echo",
            [1, "two"],
            {"three": 3.5},
            session=session,
            ordering_key="order:7",
            countdown=30,
            queue="celery",
            priority=3,
            headers={"tenant": "a"},
        )
        tasks.apply_async("rows.echo", [2], session=session)
        session.commit()
    got = stored(store_engine)
    assert [
        (r.task_id, r.task_name, r.args, r.kwargs, r.options, r.available_at, r.ordering_key)
        for r in recorded
    ] == [
        (str(r.task_id), r.task_name, r.args, r.kwargs, r.options, r.available_at, r.ordering_key)
        for r in got
    ]
    assert [1, None] == [row.ordering_seq for row in got]
    assert [OutboxStatus.PENDING, OutboxStatus.PENDING] == [row.status for row in got]
