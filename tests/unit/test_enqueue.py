"""Enqueueing writes a row in the caller's transaction and nothing else."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import pytest
from celery import Celery, chain
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from outbox import (
    ArgumentNotSerializableError,
    MissingSessionError,
    OutboxMessage,
    OutboxSettings,
    OutboxStatus,
    PayloadTooLargeError,
    TaskNotRegisteredError,
    TaskOutbox,
    UnsupportedOptionError,
)
from tests.unit.conftest import FakeClock, count_rows


def test_delay_is_invisible_until_commit(
    tasks: TaskOutbox, session: Session, engine: Engine, celery_app: Celery
) -> None:
    """The row exists for other connections only once the caller commits."""
    result = tasks.delay(celery_app.tasks["unit.add"], 2, 3)
    assert 0 == count_rows(engine)
    session.commit()
    assert 1 == count_rows(engine, task_id=uuid.UUID(result.id))


def test_rollback_leaves_no_row(
    tasks: TaskOutbox, session: Session, engine: Engine, celery_app: Celery
) -> None:
    """A rolled-back transaction takes its enqueued tasks with it."""
    tasks.delay(celery_app.tasks["unit.add"], 2, 3)
    session.rollback()
    session.commit()
    assert 0 == count_rows(engine)


def test_enqueue_does_not_flush(tasks: TaskOutbox, session: Session, celery_app: Celery) -> None:
    """Enqueue only adds to the session; the caller decides when SQL runs."""
    tasks.delay(celery_app.tasks["unit.add"], 2, 3)
    assert 1 == len(session.new)
    assert all(isinstance(obj, OutboxMessage) for obj in session.new)


def test_row_records_the_call_and_the_returned_id(
    tasks: TaskOutbox, session: Session, celery_app: Celery, clock: FakeClock
) -> None:
    """The stored row holds the task name, arguments, options and the id handed back."""
    result = tasks.apply_async(
        celery_app.tasks["unit.echo"],
        args=(1, "two"),
        kwargs={"three": 3.0},
        queue="mail",
        priority=5,
        countdown=30,
    )
    session.commit()
    row = session.scalars(select(OutboxMessage)).one()
    assert uuid.UUID(result.id) == row.task_id
    assert "unit.echo" == row.task_name
    assert [1, "two"] == row.args
    assert {"three": 3.0} == row.kwargs
    assert {"queue": "mail", "priority": 5} == row.options
    assert OutboxStatus.PENDING == row.status
    assert 0 == row.attempts
    assert clock.now == row.created_at
    assert clock.now + timedelta(seconds=30) == row.available_at
    assert row.dispatched_at is None


def test_each_enqueue_gets_its_own_task_id(
    tasks: TaskOutbox, session: Session, celery_app: Celery
) -> None:
    """Task ids are unique per enqueue, fixed at write time."""
    ids = {tasks.delay(celery_app.tasks["unit.add"], i, i).id for i in range(50)}
    session.commit()
    assert 50 == len(ids)


def test_signature_is_enqueued_with_its_options(
    tasks: TaskOutbox, session: Session, celery_app: Celery
) -> None:
    """A signature's args, kwargs and .set() options are all kept."""
    signature = celery_app.tasks["unit.echo"].s(1, key="v").set(queue="mail")
    tasks.enqueue(signature)
    session.commit()
    row = session.scalars(select(OutboxMessage)).one()
    assert ([1], {"key": "v"}, {"queue": "mail"}) == (row.args, row.kwargs, row.options)


def test_workflows_are_refused(tasks: TaskOutbox, session: Session, celery_app: Celery) -> None:
    """Chains and groups cannot be stored as one row and are refused before commit."""
    add = celery_app.tasks["unit.add"]
    with pytest.raises(UnsupportedOptionError, match="single task signatures"):
        tasks.enqueue(chain(add.s(1, 2), add.s(3)))
    assert not session.new


def test_task_name_string_is_accepted_when_registered(tasks: TaskOutbox, session: Session) -> None:
    """A registered task may be named instead of passed."""
    tasks.apply_async("unit.add", args=(1, 2))
    assert 1 == len(session.new)


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda t, app: t.delay("unit.nope", 1), TaskNotRegisteredError),
        (lambda t, app: t.delay(app.tasks["unit.echo"], {1, 2}), ArgumentNotSerializableError),
        (
            lambda t, app: t.apply_async("unit.echo", kwargs={"when": object()}),
            ArgumentNotSerializableError,
        ),
        (lambda t, app: t.apply_async("unit.echo", link="x"), UnsupportedOptionError),
    ],
    ids=["unregistered", "unserializable-arg", "unserializable-kwarg", "unsupported-option"],
)
def test_invalid_enqueue_raises_and_writes_nothing(
    tasks: TaskOutbox,
    session: Session,
    engine: Engine,
    celery_app: Celery,
    call: Any,
    error: type[Exception],
) -> None:
    """Bad input raises its specific OutboxError and nothing reaches the session."""
    with pytest.raises(error):
        call(tasks, celery_app)
    assert not session.new
    session.commit()
    assert 0 == count_rows(engine)


def test_unregistered_task_error_says_what_to_do(tasks: TaskOutbox) -> None:
    """The message names the task and tells the caller to import it."""
    with pytest.raises(TaskNotRegisteredError, match=r"'unit\.nope' is not registered.*import"):
        tasks.delay("unit.nope")


def test_connection_joins_its_open_transaction(engine: Engine, celery_app: Celery) -> None:
    """With a Core connection the row is written inside its transaction and rolls back with it."""
    tasks = TaskOutbox(celery_app)
    with engine.connect() as conn:
        tasks.apply_async("unit.add", args=(1, 2), session=conn)
        conn.rollback()
        tasks.apply_async("unit.add", args=(3, 4), session=conn)
        conn.commit()
    assert 1 == count_rows(engine)


def test_without_a_session_the_error_says_to_pass_one(celery_app: Celery) -> None:
    """A TaskOutbox without default session refuses to guess."""
    with pytest.raises(MissingSessionError, match="session="):
        TaskOutbox(celery_app).delay("unit.add", 1, 2)


def test_payload_over_the_limit_is_refused_before_commit(
    celery_app: Celery, session: Session, engine: Engine
) -> None:
    """Args larger than max_payload_bytes raise PayloadTooLargeError naming the size."""
    tasks = TaskOutbox(
        celery_app, default_session=lambda: session, settings=OutboxSettings(max_payload_bytes=100)
    )
    tasks.delay("unit.echo", "x" * 50)
    with pytest.raises(PayloadTooLargeError, match=r"over the 100-byte limit"):
        tasks.delay("unit.echo", "x" * 100)
    session.commit()
    assert 1 == count_rows(engine)
