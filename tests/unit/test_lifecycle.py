"""Lifecycle tracking: a real (embedded) Celery worker records each run on the row."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from sqlalchemy import Engine, create_engine, delete, event, select
from sqlalchemy.orm import Session

from outbox import OutboxMessage, OutboxSettings, Relay, TaskOutbox, create_tables, outbox_table
from outbox.consumers.lifecycle import ROW_ID_HEADER, LifecycleTracker
from tests.services import wait_for
from tests.unit.conftest import drain_queue, memory_app, running_worker

#: Set by ``unit.plain`` when a worker ran it.
PLAIN_RAN = threading.Event()
#: The row's task_state as ``unit.peek`` saw it while running.
PEEKED: list[str | None] = []


@pytest.fixture(scope="module")
def lifecycle_app() -> Iterator[Celery]:
    """An app on the in-memory broker with tasks that succeed, fail, and need a retry."""
    with pytest.MonkeyPatch.context() as env:
        # As conftest's autouse fixture does for each test, for the module's worker.
        env.delenv("CELERY_BROKER_URL", raising=False)
        env.delenv("CELERY_RESULT_BACKEND", raising=False)
        yield _lifecycle_app()


def _lifecycle_app() -> Celery:
    app = memory_app("lifecycle")
    runs: dict[str, int] = {}

    @app.task(name="unit.add", shared=False)
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="unit.flaky", bind=True, shared=False, max_retries=3)
    def flaky(self: Any) -> str:
        runs[self.request.id] = runs.get(self.request.id, 0) + 1
        if runs[self.request.id] == 1:
            raise self.retry(exc=ValueError("first run fails"), countdown=0)
        return "ok"

    @app.task(name="unit.broken", shared=False)
    def broken() -> None:
        raise KeyError("sku-9")

    @app.task(name="unit.plain", shared=False)
    def plain() -> None:
        PLAIN_RAN.set()

    @app.task(name="unit.peek", shared=False)
    def peek(url: str) -> None:
        engine = create_engine(url)
        try:
            with Session(engine) as session:
                PEEKED.append(session.scalars(select(OutboxMessage.task_state)).one())
        finally:
            engine.dispose()

    return app


@pytest.fixture(scope="module")
def lifecycle_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    path = tmp_path_factory.mktemp("lifecycle") / "outbox.sqlite3"
    engine = create_engine(f"sqlite:///{path}")
    create_tables(engine)
    yield engine
    engine.dispose()


@pytest.fixture(scope="module")
def tracker(lifecycle_engine: Engine) -> Iterator[LifecycleTracker]:
    tracker = LifecycleTracker(lifecycle_engine).connect()
    yield tracker
    tracker.disconnect()


@pytest.fixture(scope="module")
def module_worker(lifecycle_app: Celery, tracker: LifecycleTracker) -> Iterator[None]:
    """One embedded worker for the module: starting and stopping one takes seconds."""
    with running_worker(lifecycle_app):
        yield


@pytest.fixture
def engine(lifecycle_engine: Engine, tracker: LifecycleTracker) -> Engine:
    """The module's database, emptied, with start tracking off unless a test turns it on."""
    tracker.track_started = False
    with lifecycle_engine.begin() as conn:
        conn.execute(delete(outbox_table))
    PLAIN_RAN.clear()
    return lifecycle_engine


@pytest.fixture
def embedded_worker(module_worker: None) -> None:
    return None


def enqueue_and_publish(
    engine: Engine, app: Celery, name: str, args: tuple[Any, ...] = (), **options: Any
) -> tuple[str, OutboxMessage]:
    tasks = TaskOutbox(app)
    with Session(engine) as session:
        result = tasks.apply_async(name, args=args, session=session, **options)
        session.commit()
    assert 1 == Relay(engine, app).run_once().published
    with Session(engine) as session:
        row = session.scalars(select(OutboxMessage)).one()
    return result.id, row


def row_when_reported(engine: Engine, state: str) -> OutboxMessage:
    def reported() -> OutboxMessage | None:
        with Session(engine) as session:
            row = session.scalars(select(OutboxMessage)).one()
            return row if row.task_state == state else None

    return wait_for(reported, timeout=10)


def test_the_relay_tags_each_message_with_its_row_and_keeps_user_headers(
    engine: Engine, celery_app: Celery
) -> None:
    _, row = enqueue_and_publish(
        engine, celery_app, "unit.add", (1, 2), headers={"tenant": "acme"}, queue="tagged"
    )
    [message] = drain_queue(celery_app, "tagged")
    assert row.id == message["headers"][ROW_ID_HEADER]
    assert "acme" == message["headers"]["tenant"]


def test_success_records_state_times_and_one_run(
    engine: Engine, lifecycle_app: Celery, embedded_worker: None
) -> None:
    tasks = TaskOutbox(lifecycle_app)
    with Session(engine) as session:
        tasks.apply_async("unit.add", args=(2, 3), session=session)
        session.commit()
    Relay(engine, lifecycle_app).run_once()
    row = row_when_reported(engine, "SUCCESS")
    assert 1 == row.task_runs
    assert row.task_error is None
    assert row.task_started_at is not None
    assert row.task_finished_at is not None
    assert row.task_started_at <= row.task_finished_at


def test_a_failure_records_the_error(
    engine: Engine, lifecycle_app: Celery, embedded_worker: None
) -> None:
    enqueue_and_publish(engine, lifecycle_app, "unit.broken")
    row = row_when_reported(engine, "FAILURE")
    assert "KeyError: 'sku-9'" == row.task_error
    assert 1 == row.task_runs


def test_a_retried_task_counts_both_runs_and_keeps_why_it_was_retried(
    engine: Engine, lifecycle_app: Celery, embedded_worker: None
) -> None:
    enqueue_and_publish(engine, lifecycle_app, "unit.flaky")
    row = wait_for(
        lambda: (r := row_when_reported(engine, "SUCCESS")).task_runs == 2 and r, timeout=10
    )
    assert row.task_error is not None
    assert row.task_error.startswith("Retry in 0s: ValueError('first run fails')")


def test_track_started_marks_the_row_when_the_run_begins(
    engine: Engine, lifecycle_app: Celery, tracker: LifecycleTracker, embedded_worker: None
) -> None:
    tracker.track_started = True
    PEEKED.clear()
    enqueue_and_publish(engine, lifecycle_app, "unit.peek", (str(engine.url),))
    row_when_reported(engine, "SUCCESS")
    assert ["STARTED"] == PEEKED


def test_tasks_not_published_by_the_outbox_cost_no_statement(
    engine: Engine, lifecycle_app: Celery, tracker: LifecycleTracker, embedded_worker: None
) -> None:
    """A plain task, then an outbox task: once the second is recorded, the first (run
    before it by the same solo worker) has been through the tracker too, and nothing was
    written for it."""
    written: list[Any] = []

    def record(conn: Any, cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        # The tracker's UPDATE (the relay's mark does not touch task_runs).
        if statement.lstrip().startswith("UPDATE") and "task_runs" in statement:
            many = isinstance(parameters, list)
            written.extend(parameters if many else [parameters])

    event.listen(engine, "before_cursor_execute", record)
    try:
        lifecycle_app.tasks["unit.plain"].delay()
        assert PLAIN_RAN.wait(timeout=10)
        _, row = enqueue_and_publish(engine, lifecycle_app, "unit.add", (1, 2))
        row_when_reported(engine, "SUCCESS")
    finally:
        event.remove(engine, "before_cursor_execute", record)
    assert 1 == len(written), "one outcome written: the outbox task's, none for the plain one"
    [params] = written
    assert row.id in tuple(params.values() if isinstance(params, dict) else params)


#: A moment the out-of-order tests count from.
T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def recorded_apart(
    engine: Engine,
    lifecycle_app: Celery,
    tracker: LifecycleTracker,
    *runs: tuple[str, float, float, str | None],
) -> OutboxMessage:
    """The row after each run (state, started and finished seconds after ``T0``, error)
    is written by a worker process of its own, in the order given, as processes that
    flush on their own timers do."""
    tracker.disconnect()
    _, row = enqueue_and_publish(engine, lifecycle_app, "unit.add", (1, 2))
    try:
        for state, started, finished, error in runs:
            process = LifecycleTracker(engine, flush_interval=3600)
            process._queue(
                row.id,
                state,
                T0 + timedelta(seconds=started),
                T0 + timedelta(seconds=finished),
                error,
                T0 if error else None,
                ran=1,
            )
            assert 1 == process.flush()
    finally:
        tracker.connect()
    with Session(engine) as session:
        stored = session.get(OutboxMessage, row.id)
    assert stored is not None
    return stored


def test_an_older_run_reported_late_does_not_overwrite_a_newer_one(
    engine: Engine, lifecycle_app: Celery, tracker: LifecycleTracker
) -> None:
    """Two worker processes flush on their own timers: a retry's first run can be
    written after its second. State and times stay the newest; both runs are counted."""
    stored = recorded_apart(
        engine,
        lifecycle_app,
        tracker,
        ("SUCCESS", 5, 6, None),
        ("RETRY", 0, 1, "Retry in 5s: boom"),
    )
    assert ("SUCCESS", 2) == (stored.task_state, stored.task_runs)
    assert T0 + timedelta(seconds=6) == stored.task_finished_at
    assert "Retry in 5s: boom" == stored.task_error, "why it needed a retry is kept"


def test_a_run_that_ends_after_the_run_it_caused_does_not_overwrite_it(
    engine: Engine, lifecycle_app: Celery, tracker: LifecycleTracker
) -> None:
    """A replacement (or a retry) is published by the run before it and may succeed in
    another process before that run has ended: the later-started run's outcome stays."""
    stored = recorded_apart(
        engine,
        lifecycle_app,
        tracker,
        ("SUCCESS", 1, 2, None),  # the replacement, which ends first
        ("REPLACED", 0, 3, None),
    )
    assert ("SUCCESS", 2) == (stored.task_state, stored.task_runs)
    assert (T0 + timedelta(seconds=1), T0 + timedelta(seconds=2)) == (
        stored.task_started_at,
        stored.task_finished_at,
    )


def test_an_unreachable_database_is_logged_and_never_fails_the_task(
    lifecycle_app: Celery, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="outbox.consumers.lifecycle")
    nowhere = create_engine(f"sqlite:///{tmp_path / 'missing' / 'outbox.sqlite3'}")
    tracker = LifecycleTracker(nowhere).connect()
    try:
        result = lifecycle_app.tasks["unit.add"].apply(args=(2, 3), headers={ROW_ID_HEADER: 7})
    finally:
        tracker.disconnect()
    assert (result.state, result.result) == ("SUCCESS", 5)
    assert "could not record the lifecycle of 1 outbox row(s) (ids 7)" in caplog.text


def test_outcomes_are_written_in_batches_off_the_tasks_path(
    lifecycle_app: Celery, engine: Engine, tracker: LifecycleTracker
) -> None:
    """A run's end costs the task no statement; the writer stores many outcomes at once."""
    tracker.disconnect()  # the module's tracker would write these outcomes too
    tasks = TaskOutbox(lifecycle_app)
    with Session(engine) as session:
        for i in range(5):
            tasks.apply_async("unit.add", args=(i, 1), session=session)
        session.commit()
        row_ids = list(session.scalars(select(OutboxMessage.id).order_by(OutboxMessage.id)))
    statements: list[Any] = []

    def record(*args: Any) -> None:
        statements.append(args[2])

    writer = LifecycleTracker(engine, flush_interval=3600).connect()
    event.listen(engine, "before_cursor_execute", record)
    try:
        for row_id in row_ids:
            lifecycle_app.tasks["unit.add"].apply(args=(1, 2), headers={ROW_ID_HEADER: row_id})
        assert [] == statements, "nothing is written while the tasks run"
        assert 5 == writer.flush()
        assert 1 == len(statements), "one batched UPDATE for the five outcomes"
    finally:
        event.remove(engine, "before_cursor_execute", record)
        writer.disconnect()
        tracker.connect()
    with Session(engine) as session:
        rows = session.scalars(select(OutboxMessage)).all()
    assert {("SUCCESS", 1)} == {(row.task_state, row.task_runs) for row in rows}


def test_settings_switch_tracking_off_and_start_tracking_on() -> None:
    assert OutboxSettings().track_lifecycle
    assert not OutboxSettings().track_started
    settings = OutboxSettings.from_mapping(
        {"OUTBOX_TRACK_LIFECYCLE": "false", "OUTBOX_TRACK_STARTED": "1"}
    )
    assert (settings.track_lifecycle, settings.track_started) == (False, True)


def test_a_flag_that_is_not_one_is_refused() -> None:
    from outbox import InvalidSettingError

    with pytest.raises(InvalidSettingError, match="OUTBOX_TRACK_LIFECYCLE='sometimes'"):
        OutboxSettings.from_mapping({"OUTBOX_TRACK_LIFECYCLE": "sometimes"})


def test_disabled_tracking_connects_nothing() -> None:
    from celery.signals import task_postrun
    from flask import Flask

    from outbox.contrib.flask import Outbox

    class NoDb:
        session = None

    app = Flask(__name__)
    app.config["OUTBOX_TRACK_LIFECYCLE"] = False
    ext = Outbox(app, NoDb(), celery=Celery("off", set_as_current=False))
    receivers = len(task_postrun.receivers)
    assert ext.track_lifecycle(app) is None
    assert receivers == len(task_postrun.receivers)
