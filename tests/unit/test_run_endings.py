"""Runs that are not the task's end: ``self.replace()``, ``Reject(requeue=True)``, and a
task that ignores itself, each in a real (embedded) worker with lifecycle tracking."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery.exceptions import Ignore, Reject
from sqlalchemy import create_engine, delete, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, scoped_session, sessionmaker

from outbox import (
    OutboxSettings,
    OutboxStatus,
    ProcessedMessage,
    Relay,
    TaskOutbox,
    create_tables,
    idempotent,
    outbox_table,
)
from outbox.consumers.lifecycle import LifecycleTracker
from outbox.consumers.run_outcomes import REPLACED, REQUEUED
from outbox.data.schema import keys_table
from outbox.ordering.handover import FINAL_STATES
from tests.services import wait_for
from tests.shapes.app import effects_table, metadata
from tests.unit.conftest import memory_app, running_worker


class Shapes:
    """An app whose tasks end their first run in each of the ways above."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.app = memory_app("shapes")
        self.sessions = scoped_session(sessionmaker(engine))
        #: Runs per (task id, task name): a first run requeues or replaces itself.
        self.runs: dict[tuple[str, str], int] = {}
        self.second_run_may_go = threading.Event()
        app, sessions = self.app, self.sessions

        def first_run(task: Any) -> bool:
            place = (task.request.id, task.name)
            self.runs[place] = self.runs.get(place, 0) + 1
            return self.runs[place] == 1

        @app.task(name="shapes.apply", bind=True, acks_late=True, shared=False)
        @idempotent(sessions, transient_retries=0)
        def apply(task: Any, label: str) -> None:
            sessions.execute(effects_table.insert().values(task_id=task.request.id, label=label))

        @app.task(name="shapes.replace_idempotent", bind=True, acks_late=True, shared=False)
        @idempotent(sessions, transient_retries=0)
        def replace_idempotent(task: Any, label: str) -> None:
            raise task.replace(apply.si(f"{label} (replacement)"))

        @app.task(name="shapes.record_plainly", bind=True, shared=False)
        def record_plainly(task: Any, label: str) -> None:
            with engine.begin() as conn:
                conn.execute(effects_table.insert().values(task_id=task.request.id, label=label))

        @app.task(name="shapes.replace_with_plain", bind=True, acks_late=True, shared=False)
        @idempotent(sessions, transient_retries=0)
        def replace_with_plain(task: Any, label: str) -> None:
            raise task.replace(record_plainly.si(f"{label} (replacement)"))

        @app.task(name="shapes.replace_plainly", bind=True, shared=False)
        def replace_plainly(task: Any, label: str) -> None:
            raise task.replace(record_plainly.si(f"{label} (replacement)"))

        @app.task(name="shapes.requeue_once", bind=True, acks_late=True, shared=False)
        def requeue_once(task: Any, label: str) -> None:
            if first_run(task):
                raise Reject("not yet", requeue=True)
            # The test looks at the key between the two runs.
            assert self.second_run_may_go.wait(timeout=20)
            with engine.begin() as conn:
                conn.execute(effects_table.insert().values(task_id=task.request.id, label=label))

        @app.task(name="shapes.ignore_itself", bind=True, acks_late=True, shared=False)
        @idempotent(sessions, transient_retries=0)
        def ignore_itself(task: Any, label: str) -> None:
            raise Ignore()

    def enqueue(self, name: str, label: str, key: str | None = None) -> str:
        tasks = TaskOutbox(self.app, settings=OutboxSettings(track_lifecycle=True))
        with Session(self.engine) as session:
            result = tasks.apply_async(name, args=(label,), session=session, ordering_key=key)
            session.commit()
        return result.id

    def publish(self) -> int:
        return Relay(self.engine, self.app).drain(maintain=False).published

    def effects(self) -> list[str]:
        with self.engine.connect() as conn:
            return list(conn.scalars(select(effects_table.c.label).order_by(effects_table.c.id)))

    def state_of(self, task_id: str) -> tuple[str, str | None]:
        with self.engine.connect() as conn:
            row = conn.execute(
                select(outbox_table.c.status, outbox_table.c.task_state).where(
                    outbox_table.c.task_id == uuid.UUID(task_id)
                )
            ).one()
        return str(row.status), row.task_state

    def blocked_keys(self) -> list[str]:
        with self.engine.connect() as conn:
            return list(
                conn.scalars(select(keys_table.c.key).where(keys_table.c.blocked_at.is_not(None)))
            )

    def processed(self, task_id: str) -> bool:
        with Session(self.engine) as session:
            return session.get(ProcessedMessage, task_id) is not None


@pytest.fixture(scope="module")
def shapes_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    path: Path = tmp_path_factory.mktemp("shapes") / "outbox.sqlite3"
    engine = create_engine(f"sqlite:///{path}")
    create_tables(engine)
    metadata.create_all(engine)
    yield engine
    engine.dispose()


@pytest.fixture(scope="module")
def module_shapes(shapes_engine: Engine) -> Iterator[Shapes]:
    """One worker for the module, with lifecycle tracking, as a worker of the app runs."""
    with pytest.MonkeyPatch.context() as env:
        env.delenv("CELERY_BROKER_URL", raising=False)
        env.delenv("CELERY_RESULT_BACKEND", raising=False)
        shapes = Shapes(shapes_engine)
        tracker = LifecycleTracker(shapes_engine, flush_interval=0.02).connect()
        try:
            with running_worker(shapes.app):
                yield shapes
        finally:
            tracker.disconnect()
            shapes.sessions.remove()


@pytest.fixture
def shapes(module_shapes: Shapes) -> Shapes:
    with module_shapes.engine.begin() as conn:
        for table in (effects_table, outbox_table, keys_table, ProcessedMessage.__table__):
            conn.execute(delete(table))  # type: ignore[arg-type]
    module_shapes.runs.clear()
    module_shapes.second_run_may_go.clear()
    return module_shapes


def keep_publishing(shapes: Shapes, done: Any) -> Any:
    """Wait for ``done()``, publishing what becomes due meanwhile (the next task of a key)."""

    def check() -> Any:
        shapes.publish()
        return done()

    return wait_for(check, timeout=20)


def test_an_idempotent_task_replaced_by_an_idempotent_one_applies_the_replacement_once(
    shapes: Shapes,
) -> None:
    """The replacement runs under the same id: the replaced run must not record it."""
    task_id = shapes.enqueue("shapes.replace_idempotent", "paid")
    assert 1 == shapes.publish()
    keep_publishing(shapes, lambda: shapes.effects())
    assert ["paid (replacement)"] == shapes.effects()
    assert shapes.processed(task_id)
    wait_for(lambda: shapes.state_of(task_id)[1] == "SUCCESS")


def test_an_idempotent_task_replaced_by_a_plain_one_is_recorded_and_runs_once(
    shapes: Shapes,
) -> None:
    """A replacement that records nothing: the replaced run records the id, so the outbox
    does not publish the task again for want of a confirmation."""
    task_id = shapes.enqueue("shapes.replace_with_plain", "paid")
    assert 1 == shapes.publish()
    keep_publishing(shapes, lambda: shapes.effects())
    assert ["paid (replacement)"] == shapes.effects()
    assert shapes.processed(task_id)


@pytest.mark.parametrize("name", ["shapes.replace_idempotent", "shapes.replace_plainly"])
def test_a_key_waits_for_the_replacement_then_goes_on(shapes: Shapes, name: str) -> None:
    """The key's next task is published only when the replacement has finished."""
    first = shapes.enqueue(name, "paid", key="order:1")
    second = shapes.enqueue("shapes.record_plainly", "shipped", key="order:1")
    keep_publishing(shapes, lambda: len(shapes.effects()) == 2)
    assert ["paid (replacement)", "shipped"] == shapes.effects()
    assert [] == shapes.blocked_keys()
    wait_for(lambda: shapes.state_of(second)[1] == "SUCCESS")
    assert "SUCCESS" == shapes.state_of(first)[1]


def test_a_requeued_rejection_neither_blocks_its_key_nor_lets_the_next_task_overtake(
    shapes: Shapes,
) -> None:
    """``Reject(requeue=True)`` is not a final failure: the key waits for the next run."""
    first = shapes.enqueue("shapes.requeue_once", "paid", key="order:1")
    shapes.enqueue("shapes.record_plainly", "shipped", key="order:1")
    shapes.publish()
    # The second run has begun (and waits): the first one's end is written by then.
    wait_for(lambda: shapes.runs.get((first, "shapes.requeue_once")) == 2)
    assert [] == shapes.blocked_keys(), "a requeued run does not stop its key"
    assert 0 == shapes.publish(), "nor lets the next task go before it"
    shapes.second_run_may_go.set()
    keep_publishing(shapes, lambda: len(shapes.effects()) == 2)
    assert ["paid", "shipped"] == shapes.effects()
    assert [] == shapes.blocked_keys()
    assert OutboxStatus.DISPATCHED == shapes.state_of(first)[0]
    assert 2 == shapes.runs[(first, "shapes.requeue_once")]


def test_an_ordered_task_that_ignores_itself_hands_its_key_on(shapes: Shapes) -> None:
    """``Ignore`` raised by the task itself ends it, as Celery's IGNORED state says."""
    first = shapes.enqueue("shapes.ignore_itself", "paid", key="order:1")
    shapes.enqueue("shapes.record_plainly", "shipped", key="order:1")
    keep_publishing(shapes, lambda: shapes.effects())
    assert ["shipped"] == shapes.effects()
    assert [] == shapes.blocked_keys()
    assert shapes.processed(first)


@pytest.mark.parametrize("state", [REPLACED, REQUEUED])
def test_a_run_that_is_not_the_end_is_no_final_state(state: str) -> None:
    """The key keeper hands keys on from final states only: these two are not."""
    assert state not in FINAL_STATES
