"""Idempotent consumers: effects and the processed marker commit together, once per task id."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from celery import Celery
from celery.exceptions import Reject
from sqlalchemy import Column, Engine, Integer, MetaData, String, Table, func, select
from sqlalchemy import exc as sa_exc
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, scoped_session, sessionmaker

from outbox import IdempotencyError, ProcessedMessage, idempotent, is_transient_database_error

effects_metadata = MetaData()
effects = Table(
    "effects",
    effects_metadata,
    Column("id", Integer, primary_key=True),
    Column("task_id", String(64)),
)


@pytest.fixture
def db(engine: Engine) -> Iterator[scoped_session[Session]]:
    effects_metadata.create_all(engine)
    session = scoped_session(sessionmaker(engine))
    yield session
    session.remove()


@pytest.fixture
def record(celery_app: Celery, db: scoped_session[Session]) -> Any:
    """A bound task that records one effect row and fails on demand."""
    celery_app.conf.task_always_eager = True

    @celery_app.task(name="unit.record", bind=True, shared=False, max_retries=3)
    @idempotent(lambda: db)
    def record(self: Any, fail_first: str | None = None) -> str:
        db.execute(effects.insert().values(task_id=self.request.id))
        if fail_first and self.request.retries == 0:
            if fail_first == "retry":
                raise self.retry(countdown=0)
            raise RuntimeError("boom")
        return "done"

    return record


def count(db: scoped_session[Session], query: Callable[[], Any]) -> int:
    return int(db.scalar(query()) or 0)


def effect_count(db: scoped_session[Session]) -> int:
    return count(db, lambda: select(func.count()).select_from(effects))


def test_a_repeated_delivery_applies_the_effect_once(
    record: Any, db: scoped_session[Session]
) -> None:
    """The same task id run twice: effect once, the repeat returns None."""
    assert "done" == record.apply(task_id="t-1").get()
    assert record.apply(task_id="t-1").get() is None
    assert 1 == effect_count(db)
    assert ["t-1"] == list(db.scalars(select(ProcessedMessage.task_id)))


def test_different_task_ids_each_apply(record: Any, db: scoped_session[Session]) -> None:
    """Deduplication is per id, not per task."""
    record.apply(task_id="t-1")
    record.apply(task_id="t-2")
    assert 2 == effect_count(db)


def test_a_failed_run_commits_no_effect_and_counts_as_consumed(
    record: Any, db: scoped_session[Session]
) -> None:
    """An exception rolls the effect back; like Celery's ack, the id is then consumed."""
    with pytest.raises(RuntimeError, match="boom"):
        record.apply(task_id="t-1", kwargs={"fail_first": "raise"}, throw=True)
    assert 0 == effect_count(db)
    assert ["t-1"] == list(db.scalars(select(ProcessedMessage.task_id)))
    assert record.apply(task_id="t-1").get() is None, "not published again by the outbox"


def test_an_interrupted_run_leaves_the_id_for_the_next_delivery(
    celery_app: Celery, db: scoped_session[Session]
) -> None:
    """A process going down mid-task (SystemExit) records nothing; the redelivery runs."""
    runs: list[str] = []

    @celery_app.task(name="unit.interrupted", bind=True, shared=False)
    @idempotent(lambda: db)
    def interrupted(self: Any) -> str:
        db.execute(effects.insert().values(task_id=self.request.id))
        runs.append(self.request.id)
        if len(runs) == 1:
            raise SystemExit(1)
        return "done"

    with pytest.raises(SystemExit):
        interrupted.apply(task_id="t-1", throw=True)
    assert 0 == effect_count(db)
    assert "done" == interrupted.apply(task_id="t-1").get()
    assert 1 == effect_count(db)


def test_committing_inside_the_task_is_refused(
    celery_app: Celery, db: scoped_session[Session]
) -> None:
    """A commit inside would split effects from the marker: it raises, nothing is applied."""

    @celery_app.task(name="unit.commits", bind=True, shared=False)
    @idempotent(lambda: db)
    def commits(self: Any) -> None:
        db.execute(effects.insert().values(task_id=self.request.id))
        db.commit()

    with pytest.raises(IdempotencyError, match="committed its session itself"):
        commits.apply(task_id="t-1", throw=True)
    assert 0 == effect_count(db)


def test_rolling_back_inside_the_task_is_refused(
    celery_app: Celery, db: scoped_session[Session]
) -> None:
    """A rollback inside loses the marker: committing the rest would repeat effects."""

    @celery_app.task(name="unit.rolls_back", bind=True, shared=False)
    @idempotent(lambda: db)
    def rolls_back(self: Any) -> None:
        db.rollback()
        db.execute(effects.insert().values(task_id=self.request.id))

    with pytest.raises(IdempotencyError, match="rolled back its session"):
        rolls_back.apply(task_id="t-1", throw=True)
    assert 0 == effect_count(db)


def test_a_nested_idempotent_call_joins_the_outer_transaction(
    celery_app: Celery, db: scoped_session[Session]
) -> None:
    """Calling another idempotent task function inside one shares its single commit."""

    @celery_app.task(name="unit.inner", bind=True, shared=False)
    @idempotent(lambda: db)
    def inner(self: Any, task_id: str) -> None:
        db.execute(effects.insert().values(task_id=f"{task_id}-inner"))

    @celery_app.task(name="unit.outer", bind=True, shared=False)
    @idempotent(lambda: db)
    def outer(self: Any) -> None:
        db.execute(effects.insert().values(task_id=self.request.id))
        inner(self.request.id)

    outer.apply(task_id="t-1", throw=True)
    outer.apply(task_id="t-1", throw=True)
    assert ["t-1", "t-1-inner"] == sorted(db.scalars(select(effects.c.task_id)))


def test_unsaved_changes_at_start_are_refused(record: Any, db: scoped_session[Session]) -> None:
    """Pending objects in the session would commit with the task: it refuses to start."""
    db.add(ProcessedMessage(task_id="stray", task_name="x", processed_at=datetime.now(UTC)))
    with pytest.raises(IdempotencyError, match="unsaved changes"):
        record.apply(task_id="t-1", throw=True)
    db.rollback()
    assert 0 == effect_count(db)


def test_celery_retry_keeps_the_id_and_still_runs(record: Any, db: scoped_session[Session]) -> None:
    """self.retry() re-runs under the same id; the retry is not mistaken for a duplicate."""
    result = record.apply(task_id="t-1", kwargs={"fail_first": "retry"})
    assert "done" == result.get()
    assert ["t-1"] == list(db.scalars(select(effects.c.task_id)))


def test_called_as_a_plain_function_it_just_runs_and_commits(
    celery_app: Celery, db: scoped_session[Session]
) -> None:
    """Outside a task there is no id to deduplicate on: the function runs and commits."""

    @idempotent(lambda: db)
    def write() -> None:
        db.execute(effects.insert().values(task_id="direct"))

    write()
    write()
    db.remove()
    assert 2 == effect_count(db)


def connection_lost() -> OperationalError:
    """What SQLAlchemy raises when the server closes the connection under a statement."""
    return OperationalError("INSERT ...", {}, ConnectionResetError("server closed the connection"))


@pytest.fixture
def fails_first(celery_app: Celery, db: scoped_session[Session]) -> Callable[..., Any]:
    """Registers a task that writes its effect, raises ``error`` on its first run, and
    succeeds after; returns the task."""

    def make(error: Callable[[Any], BaseException], **options: Any) -> Any:
        @celery_app.task(
            name=f"unit.fails_first.{uuid.uuid4().hex}", bind=True, shared=False, **options
        )
        @idempotent(lambda: db)
        def task(self: Any) -> str:
            db.execute(effects.insert().values(task_id=self.request.id))
            if self.request.retries == 0:
                raise error(self)
            return "done"

        return task

    return make


def processed_ids(db: scoped_session[Session]) -> list[str]:
    db.remove()
    return list(db.scalars(select(ProcessedMessage.task_id)))


def test_a_database_failure_is_retried_and_never_recorded(
    fails_first: Callable[..., Any], db: scoped_session[Session]
) -> None:
    """The connection dropped under the run: no effect, no marker, and a retry that runs."""
    task = fails_first(lambda _: connection_lost())
    result = task.apply(task_id="t-1")
    assert "done" == result.get()
    assert ["t-1"] == list(db.scalars(select(effects.c.task_id))), "the retry's effect only"
    assert ["t-1"] == processed_ids(db)


def test_with_no_retries_left_a_database_failure_fails_unrecorded(
    celery_app: Celery, db: scoped_session[Session]
) -> None:
    """transient_retries=0: the run fails, and its id stays free for the next delivery."""

    @celery_app.task(name="unit.no_retries", bind=True, shared=False)
    @idempotent(lambda: db, transient_retries=0)
    def always_down(self: Any) -> None:
        db.execute(effects.insert().values(task_id=self.request.id))
        raise connection_lost()

    with pytest.raises(OperationalError):
        always_down.apply(task_id="t-1", throw=True)
    assert (0, []) == (effect_count(db), processed_ids(db))


def test_an_exception_celery_will_autoretry_is_not_consumed(
    fails_first: Callable[..., Any], db: scoped_session[Session]
) -> None:
    """autoretry_for with retries left: the retry runs (recording the first would skip it)."""
    task = fails_first(lambda _: TimeoutError("carrier"), autoretry_for=(TimeoutError,))
    assert "done" == task.apply(task_id="t-1").get()
    assert ["t-1"] == processed_ids(db)
    assert 1 == effect_count(db)


def test_a_requeued_rejection_is_not_consumed_and_a_final_one_is(
    fails_first: Callable[..., Any], db: scoped_session[Session]
) -> None:
    """Reject(requeue=True) leaves the id for the redelivery; Reject(requeue=False) is final."""
    again = fails_first(lambda _: Reject("later", requeue=True))
    again.apply(task_id="requeued")
    final = fails_first(lambda _: Reject("never", requeue=False))
    final.apply(task_id="rejected")
    assert ["rejected"] == processed_ids(db)
    assert 0 == effect_count(db)


def test_a_task_s_own_failure_past_its_retries_is_consumed(
    fails_first: Callable[..., Any], db: scoped_session[Session]
) -> None:
    """An autoretried exception with no retries left is the task's own, final failure."""
    task = fails_first(
        lambda _: TimeoutError("carrier"), autoretry_for=(TimeoutError,), max_retries=0
    )
    with pytest.raises(TimeoutError):
        task.apply(task_id="t-1", throw=True)
    assert ["t-1"] == processed_ids(db)
    assert 0 == effect_count(db)


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (connection_lost(), True),
        (sa_exc.InterfaceError("SELECT 1", {}, Exception("connection already closed")), True),
        (sa_exc.DisconnectionError("pre-ping failed"), True),
        (sa_exc.TimeoutError("QueuePool limit of size 5 overflow 10 reached"), True),
        (
            sa_exc.DBAPIError("SELECT 1", {}, Exception("reset"), connection_invalidated=True),
            True,
        ),
        (sa_exc.IntegrityError("INSERT", {}, Exception("duplicate key")), False),
        (sa_exc.DataError("INSERT", {}, Exception("value too long")), False),
        (LookupError("order 42 does not exist"), False),
    ],
)
def test_a_database_failure_is_told_from_the_code_s(error: Exception, transient: bool) -> None:
    """Connection trouble (including the pool's and the server's) is transient; a
    constraint, a bad value or the code's own exception is not."""
    assert transient == is_transient_database_error(error)


def test_an_exception_raised_because_of_a_lost_connection_is_transient() -> None:
    """The task wrapped the database's error in its own: the cause still counts."""

    def reserve() -> None:
        try:
            raise connection_lost()
        except OperationalError as e:
            raise RuntimeError("could not reserve stock") from e

    with pytest.raises(RuntimeError) as raised:
        reserve()
    assert is_transient_database_error(raised.value)
