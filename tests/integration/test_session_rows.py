"""Rows enqueued into an ORM session keep the session's rules, and a flush inserts them
all with one statement, on every database the outbox supports (``store_engine``)."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery
from sqlalchemy import Engine, event, func, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from outbox import OutboxMessage, OutboxSettings, OutboxStatus, TaskOutbox, outbox_table
from outbox.data.schema import keys_table
from outbox.enqueue.task_outbox import EnqueuedTask
from tests.services import lock_waiters, wait_for
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
        assert [OutboxMessage] == [type(o) for o in session.new], "one stand-in for the rows"
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


def test_a_released_savepoint_keeps_its_rows_and_a_later_one_takes_only_its_own(
    store_engine: Engine, celery_app: Celery
) -> None:
    """Savepoints nested in savepoints: each flush boundary is followed, whether the
    rows were noted before, inside or after each savepoint."""
    tasks = TaskOutbox(celery_app)
    with Session(store_engine) as session:
        kept = [tasks.apply_async("rows.echo", ["outer"], session=session).id]
        with session.begin_nested():
            kept.append(tasks.apply_async("rows.echo", ["released"], session=session).id)
            inner = session.begin_nested()
            tasks.apply_async("rows.echo", ["rolled back, inner"], session=session)
            inner.rollback()
            kept.append(tasks.apply_async("rows.echo", ["released, after"], session=session).id)
        middle = session.begin_nested()
        tasks.apply_async("rows.echo", ["rolled back"], session=session)
        with session.begin_nested():
            tasks.apply_async("rows.echo", ["released inside a rolled-back one"], session=session)
        middle.rollback()
        kept.append(tasks.apply_async("rows.echo", ["last"], session=session).id)
        session.commit()
    assert kept == [str(row.task_id) for row in stored(store_engine)]


def test_rows_expunged_with_everything_else_are_not_inserted(
    store_engine: Engine, celery_app: Celery
) -> None:
    """``expunge_all()`` drops the rows not yet flushed, as it drops any pending object;
    the rows enqueued after it are inserted."""
    tasks = TaskOutbox(celery_app)
    with Session(store_engine) as session:
        tasks.apply_async("rows.echo", ["dropped"], session=session)
        session.expunge_all()
        session.flush()
        tasks.apply_async("rows.echo", ["also dropped"], session=session)
        session.expunge_all()
        after = tasks.apply_async("rows.echo", ["after"], session=session).id
        session.commit()
    assert [after] == [str(row.task_id) for row in stored(store_engine)]


def test_a_failed_flush_leaves_its_rows_to_the_callers_rollback(
    store_engine: Engine, celery_app: Celery
) -> None:
    """The listener's INSERT fails (a task id already taken): the flush raises with the
    rows still noted and their stand-in pending, as the ORM leaves its own objects, and
    the caller's rollback drops them; the transaction after it starts clean."""
    tasks = TaskOutbox(celery_app)
    with Session(store_engine) as first:
        taken = tasks.apply_async("rows.echo", ["first"], session=first).id
        first.commit()
    with Session(store_engine) as session:
        tasks.apply_async("rows.echo", ["dropped"], session=session)
        noted = session.info["celery_outbox.noted_rows"]
        noted.rows.append({**noted.rows[0], "task_id": uuid.UUID(taken)})
        with pytest.raises(IntegrityError):
            session.flush()
        assert noted is session.info["celery_outbox.noted_rows"]
        assert [noted.stand_in] == list(session.new)
        session.rollback()
        assert not session.new
        assert "celery_outbox.noted_rows" not in session.info
        tasks.apply_async("rows.echo", ["second"], session=session)
        session.commit()
    assert [["first"], ["second"]] == [row.args for row in stored(store_engine)]


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


def key_rows(engine: Engine) -> dict[str, tuple[int, int | None]]:
    with engine.connect() as conn:
        return {
            key: (last, head)
            for key, last, head in conn.execute(
                select(keys_table.c.key, keys_table.c.last_seq, keys_table.c.head_seq)
            )
        }


def test_ordered_rows_of_one_flush_are_numbered_in_enqueue_order(
    store_engine: Engine, celery_app: Celery
) -> None:
    """Each key's rows take its next numbers in the order they were enqueued; the first
    row of a key nobody holds holds it, the others wait behind it."""
    tasks = TaskOutbox(celery_app, settings=OutboxSettings(track_lifecycle=True))
    with Session(store_engine) as session:
        for args, key in [(["a1"], "a"), (["a2"], "a"), (["free"], None), (["b1"], "b")]:
            tasks.apply_async("rows.echo", args, session=session, ordering_key=key)
        session.flush()
        tasks.apply_async("rows.echo", ["a3"], session=session, ordering_key="a")
        session.commit()
    got = [(r.args[0], r.ordering_key, r.ordering_seq, r.status) for r in stored(store_engine)]
    assert [
        ("a1", "a", 1, OutboxStatus.PENDING),
        ("a2", "a", 2, OutboxStatus.HELD),
        ("free", None, None, OutboxStatus.PENDING),
        ("b1", "b", 1, OutboxStatus.PENDING),
        ("a3", "a", 3, OutboxStatus.HELD),
    ] == got
    assert {"a": (3, 1), "b": (1, 1)} == key_rows(store_engine)


def test_rows_for_a_busy_key_all_wait(store_engine: Engine, celery_app: Celery) -> None:
    tasks = TaskOutbox(celery_app, settings=OutboxSettings(track_lifecycle=True))
    for batch in (["first"], ["second", "third"]):
        with Session(store_engine) as session:
            for arg in batch:
                tasks.apply_async("rows.echo", [arg], session=session, ordering_key="k")
            session.commit()
    got = [(r.args[0], r.ordering_seq, r.status) for r in stored(store_engine)]
    assert [
        ("first", 1, OutboxStatus.PENDING),
        ("second", 2, OutboxStatus.HELD),
        ("third", 3, OutboxStatus.HELD),
    ] == got
    assert {"k": (3, 1)} == key_rows(store_engine)


@pytest.mark.parametrize("first_commits", [True, False])
def test_a_second_writer_to_a_key_waits_for_the_first_flush_to_end(
    store_engine: Engine, celery_app: Celery, first_commits: bool
) -> None:
    """From its flush until it ends, a writer holds the key's row: another writer's flush
    waits, then comes next (or takes the first number, if the first rolled back)."""
    if store_engine.dialect.name == "sqlite":
        pytest.skip("SQLite has one writer: the second transaction cannot even start")
    tasks = TaskOutbox(celery_app, settings=OutboxSettings(track_lifecycle=True))
    done = threading.Event()

    def second_writer() -> None:
        with Session(store_engine) as session:
            tasks.apply_async("rows.echo", ["second"], session=session, ordering_key="k")
            session.commit()
        done.set()

    with Session(store_engine) as first:
        tasks.apply_async("rows.echo", ["first"], session=first, ordering_key="k")
        first.flush()
        writer = threading.Thread(target=second_writer)
        writer.start()
        wait_for(lambda: lock_waiters(store_engine) > 0, timeout=10, interval=0.25)
        assert not done.is_set(), "the second writer did not wait for the first"
        if first_commits:
            first.commit()
        else:
            first.rollback()
    writer.join(10)
    assert done.is_set()
    got = [(r.args[0], r.ordering_seq, r.status) for r in stored(store_engine)]
    if first_commits:
        assert [("first", 1, OutboxStatus.PENDING), ("second", 2, OutboxStatus.HELD)] == got
    else:
        assert [("second", 1, OutboxStatus.PENDING)] == got
