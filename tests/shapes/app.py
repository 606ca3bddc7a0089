"""The shapes app: a Celery app, an engine and a session of its own, and one task for
each shape of task users write (``tests/integration/test_task_shapes.py``).

Every task takes a label and applies one effect, a row of ``shape_effects`` with its task
id; the first delivery of some ends another way first (retried, requeued, replaced, past
a time limit). Idempotent tasks write the effect in the session the wrapper commits;
the plain one commits its own. What happened on earlier deliveries is counted in Redis
(``SHAPES_COUNTER_URL``), outside every transaction, so a rolled-back run still counts.
"""

from __future__ import annotations

import os
import time
from typing import Any

import redis
from celery import Celery
from celery.exceptions import Ignore, Reject, SoftTimeLimitExceeded
from kombu import Queue
from sqlalchemy import Column, Integer, MetaData, String, Table, create_engine
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, scoped_session, sessionmaker

from outbox import idempotent

#: The queues: the default one, one a task names itself, one ``task_routes`` picks.
DEFAULT_QUEUE, OWN_QUEUE, ROUTED_QUEUE = "shapes", "shapes.own", "shapes.routed"
#: Seconds of the time-limit shapes' limits.
SOFT_LIMIT, HARD_LIMIT = 0.5, 2.0

metadata = MetaData()
effects_table = Table(
    "shape_effects",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("task_id", String(64), nullable=False),
    Column("label", String(64), nullable=False),
)


class FlakyError(Exception):
    """What a task with ``autoretry_for`` fails with on its first try."""


class Database:
    """The engine and session of a process, made at first use (after a worker forks)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._engine: Engine | None = None
        self.sessions = scoped_session(sessionmaker())

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = create_engine(self.url, pool_pre_ping=True)
            self.sessions.configure(bind=self._engine)
        return self._engine

    def session(self) -> Session:
        self.engine  # noqa: B018 - binds the session factory at first use
        return self.sessions()


def make_app(broker_url: str, database_url: str, counter_url: str) -> Celery:
    """The shapes app on ``broker_url``, its effects in ``database_url``."""
    app = Celery("shapes", set_as_current=False)
    app.conf.update(
        # All three: CELERY_BROKER_URL in the environment outranks broker_url alone.
        broker_url=broker_url,
        broker_read_url=broker_url,
        broker_write_url=broker_url,
        broker_connection_retry_on_startup=True,
        task_serializer="json",
        accept_content=["json"],
        task_default_queue=DEFAULT_QUEUE,
        task_queues=[Queue(DEFAULT_QUEUE), Queue(OWN_QUEUE), Queue(ROUTED_QUEUE)],
        task_routes={"shapes.routed_by_task_routes": {"queue": ROUTED_QUEUE}},
        worker_prefetch_multiplier=1,
    )
    if broker_url.startswith("redis"):
        # As the example's: a message whose worker died goes back after a minute.
        app.conf.broker_transport_options = {
            "visibility_timeout": 60,
            "unacked_restore_interval": 5,
        }
    database = Database(database_url)
    counter = redis.Redis.from_url(counter_url)
    app.conf.shapes_database = database

    def delivery(task: Any, what: str) -> int:
        """How many times ``what`` has happened to this task, this one included."""
        return int(counter.incr(f"shapes:{what}:{task.request.id}"))

    def apply(task: Any, label: str) -> None:
        database.session().execute(
            effects_table.insert().values(task_id=task.request.id, label=label)
        )

    once = idempotent(database.session, transient_retries=0)
    late = {"bind": True, "acks_late": True, "reject_on_worker_lost": True, "shared": False}

    @app.task(name="shapes.idempotent_acks_late", **late)
    @once
    def idempotent_acks_late(self: Any, label: str) -> None:
        apply(self, label)

    @app.task(name="shapes.idempotent_on_receipt", bind=True, shared=False)
    @once
    def idempotent_on_receipt(self: Any, label: str) -> None:
        apply(self, label)

    @app.task(name="shapes.plain", bind=True, shared=False)
    def plain(self: Any, label: str) -> None:
        with database.engine.begin() as conn:
            conn.execute(effects_table.insert().values(task_id=self.request.id, label=label))

    @app.task(name="shapes.routed_by_its_queue", queue=OWN_QUEUE, **late)
    @once
    def routed_by_its_queue(self: Any, label: str) -> None:
        apply(self, label)

    @app.task(name="shapes.routed_by_task_routes", **late)
    @once
    def routed_by_task_routes(self: Any, label: str) -> None:
        apply(self, label)

    @app.task(name="shapes.retry", **late)
    @once
    def retry(self: Any, label: str) -> None:
        if self.request.retries == 0:
            raise self.retry(countdown=0.2)
        apply(self, label)

    @app.task(
        name="shapes.autoretry",
        autoretry_for=(FlakyError,),
        default_retry_delay=0.2,
        max_retries=3,
        **late,
    )
    @once
    def autoretry(self: Any, label: str) -> None:
        if self.request.retries == 0:
            raise FlakyError("first try")
        apply(self, label)

    @app.task(name="shapes.reject_requeue", **late)
    @once
    def reject_requeue(self: Any, label: str) -> None:
        if delivery(self, "reject") == 1:
            raise Reject("not yet", requeue=True)
        apply(self, label)

    @app.task(name="shapes.replace", **late)
    @once
    def replace(self: Any, label: str) -> None:
        raise self.replace(idempotent_acks_late.si(label))

    @app.task(name="shapes.ignore", **late)
    @once
    def ignore(self: Any, label: str) -> None:
        raise Ignore()

    @app.task(
        name="shapes.soft_time_limit",
        soft_time_limit=SOFT_LIMIT,
        autoretry_for=(SoftTimeLimitExceeded,),
        default_retry_delay=0.2,
        max_retries=3,
        **late,
    )
    @once
    def soft_time_limit(self: Any, label: str) -> None:
        if self.request.retries == 0:
            time.sleep(10 * SOFT_LIMIT)  # interrupted by SoftTimeLimitExceeded
        apply(self, label)

    @app.task(name="shapes.hard_time_limit", time_limit=HARD_LIMIT, **late)
    @once
    def hard_time_limit(self: Any, label: str) -> None:
        if delivery(self, "hard") == 1:
            time.sleep(30 * HARD_LIMIT)  # the pool kills the process first
        apply(self, label)

    return app


def app_from_environment() -> Celery:
    """The app a worker runs (``celery -A tests.shapes.worker worker``)."""
    return make_app(
        os.environ["CELERY_BROKER_URL"],
        os.environ["SHAPES_DATABASE_URL"],
        os.environ["SHAPES_COUNTER_URL"],
    )
