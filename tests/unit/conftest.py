"""Unit fixtures: SQLite and kombu's in-memory transport, no services."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from celery.contrib.testing.worker import start_worker
from flask import Flask
from kombu.transport import memory
from sqlalchemy import Engine, create_engine, func, select
from sqlalchemy.orm import Session

from outbox import OutboxSettings, Relay, TaskOutbox, create_tables, outbox_table


class FakeClock:
    """A clock tests move by hand, so due times are exact."""

    def __init__(self) -> None:
        self.now = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        from datetime import timedelta

        self.now += timedelta(seconds=seconds)


@pytest.fixture(autouse=True)
def _no_broker_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # Celery lets CELERY_BROKER_URL override a broker= argument; unit tests use memory://.
    monkeypatch.delenv("CELERY_BROKER_URL", raising=False)
    monkeypatch.delenv("CELERY_RESULT_BACKEND", raising=False)
    # The example app copies OUTBOX_* variables into its config: a developer's own must
    # not change what unit tests see.
    for name in ("OUTBOX_DASHBOARD_BASIC_AUTH", "OUTBOX_FLOWER_URL"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(autouse=True)
def _empty_memory_broker() -> None:
    # kombu's memory transport keeps its queues on the class, shared by every app in
    # the process: start each test with an empty broker.
    memory.Channel.queues.clear()


def memory_app(name: str) -> Celery:
    """A Celery app on kombu's in-memory broker, JSON only."""
    app = Celery(name, broker="memory://", set_as_current=False)
    # The in-memory broker is polled: an embedded worker polls often, so tests don't
    # wait a second a task.
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        broker_transport_options={"polling_interval": 0.02},
    )
    return app


@contextlib.contextmanager
def running_worker(app: Celery) -> Iterator[None]:
    """A real Celery worker in a thread of this process (solo pool), on ``app``'s broker.

    Starting one sets up Celery's logging (root level ERROR, a stderr handler): the root
    logger is put back afterwards, so later tests still see warnings in ``caplog``.
    """
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    try:
        with start_worker(app, perform_ping_check=False, shutdown_timeout=5):
            yield
    finally:
        root.setLevel(level)
        root.handlers[:] = handlers


@pytest.fixture
def celery_app() -> Celery:
    app = memory_app("unit")

    @app.task(name="unit.add", shared=False)
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="unit.echo", shared=False)
    def echo(*args: Any, **kwargs: Any) -> Any:
        return args, kwargs

    return app


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    engine = create_engine(f"sqlite:///{tmp_path / 'outbox.sqlite3'}")
    create_tables(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def session(engine: Engine) -> Iterator[Session]:
    with Session(engine) as session:
        yield session


@pytest.fixture
def tasks(celery_app: Celery, clock: FakeClock, session: Session) -> TaskOutbox:
    return TaskOutbox(celery_app, default_session=lambda: session, clock=clock)


@pytest.fixture
def relay(engine: Engine, celery_app: Celery, clock: FakeClock) -> Relay:
    return Relay(engine, celery_app, OutboxSettings(batch_size=10), clock=clock)


@pytest.fixture
def app(tmp_path: Path) -> Iterator[Flask]:
    """The example orders app on a SQLite file of its own, tables created."""
    from webapp import create_app, init_db
    from webapp.extensions import db

    app = create_app({"SQLALCHEMY_DATABASE_URI": f"sqlite:///{tmp_path / 'orders.sqlite3'}"})
    with app.app_context():
        init_db(db.engine)
    yield app
    with app.app_context():
        db.engine.dispose()


@pytest.fixture
def app_context(app: Flask) -> Iterator[Flask]:
    """The example app with an application context pushed for the test."""
    with app.app_context():
        yield app


def count_rows(engine: Engine, **where: Any) -> int:
    query = select(func.count()).select_from(outbox_table)
    for column, value in where.items():
        query = query.where(outbox_table.c[column] == value)
    with engine.connect() as conn:
        return int(conn.execute(query).scalar_one())


def drain_queue(celery_app: Celery, queue: str = "celery") -> list[dict[str, Any]]:
    """Every message waiting in ``queue`` of the in-memory broker, as headers + body."""
    messages = []
    with celery_app.connection() as conn:
        simple = conn.SimpleQueue(queue)
        while simple.qsize():
            message = simple.get(timeout=1)
            messages.append(
                {
                    "headers": message.headers,
                    "body": message.payload,
                    "properties": message.properties,
                    "delivery_info": message.delivery_info,
                }
            )
            message.ack()
        simple.close()
    return messages
