"""Idempotent consumers: effects and the processed marker commit together, once per task id."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from celery import Celery
from sqlalchemy import Column, Engine, Integer, MetaData, String, Table, func, select
from sqlalchemy.orm import Session, scoped_session, sessionmaker

from outbox import ProcessedMessage, idempotent

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


def test_a_failed_run_commits_nothing_so_the_next_delivery_runs(
    record: Any, db: scoped_session[Session]
) -> None:
    """An exception rolls back the effect and the marker together."""
    with pytest.raises(RuntimeError, match="boom"):
        record.apply(task_id="t-1", kwargs={"fail_first": "raise"}, throw=True)
    assert 0 == effect_count(db)
    assert 0 == count(db, lambda: select(func.count()).select_from(ProcessedMessage))
    assert "done" == record.apply(task_id="t-1").get()
    assert 1 == effect_count(db)


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
