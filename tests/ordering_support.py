"""Running ordered tasks the way a worker does, without one: from the broker's messages.

The relay publishes to kombu's in-memory broker; a test takes the messages in whatever
order it likes (as parallel workers would run them) and runs each task in this process
with the message's headers, so the idempotent wrapper and the lifecycle signals see what
they see in a worker. What a task applied is a row in ``ordering_applied``, written in
the task's own transaction: committed effects only.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from typing import Any

from celery import Celery
from celery.exceptions import Retry
from sqlalchemy import Column, Integer, MetaData, String, Table, select
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session

from outbox import TaskOutbox, idempotent
from outbox.ordering.handover import KEY_HEADER, SEQ_HEADER

metadata = MetaData()
applied_table = Table(
    "ordering_applied",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("ordering_key", String(255), nullable=False),
    Column("label", String(64), nullable=False),
    Column("task_id", String(64), nullable=False),
)

#: What the next run of ``ordering.apply`` does: ``ok``, ``retry`` (Celery will run it
#: again) or ``fail`` (it fails for good).
SUCCESS, RETRY, FAIL = "ok", "retry", "fail"


class TaskFailedError(Exception):
    """A task's own, final failure."""


@dataclass
class Consumer:
    """The ordered tasks of one test, registered on its Celery app."""

    engine: Engine
    celery_app: Celery
    outcome: str = SUCCESS
    _local: threading.local = field(default_factory=threading.local)

    def register(self) -> None:
        metadata.create_all(self.engine)

        def session() -> Session:
            db: Session | None = getattr(self._local, "session", None)
            if db is None:
                db = self._local.session = Session(self.engine)
            return db

        @self.celery_app.task(name="ordering.apply", bind=True, shared=False)
        @idempotent(session, transient_retries=0)
        def apply(task: Any, key: str, label: str) -> None:
            if self.outcome == RETRY:
                raise Retry("not yet")
            if self.outcome == FAIL:
                raise TaskFailedError(label)
            session().execute(
                applied_table.insert().values(
                    ordering_key=key, label=label, task_id=task.request.id
                )
            )

        @self.celery_app.task(name="ordering.plain", bind=True, shared=False)
        def plain(task: Any, key: str, label: str) -> None:
            """Not an idempotent consumer: lifecycle tracking reports that it finished."""
            if self.outcome == FAIL:
                raise TaskFailedError(label)
            with self.engine.begin() as conn:
                conn.execute(
                    applied_table.insert().values(
                        ordering_key=key, label=label, task_id=task.request.id
                    )
                )

    def run(self, message: dict[str, Any], outcome: str = SUCCESS) -> str:
        """Run the task of ``message`` (as ``drain_queue`` returns it) here, the way a
        worker would, with ``outcome``; return Celery's state for the run."""
        self.outcome = outcome
        try:
            headers = message["headers"]
            task = self.celery_app.tasks[headers["task"]]
            args, kwargs, _embed = message["body"]
            result = task.apply(args=args, kwargs=kwargs, task_id=headers["id"], headers=headers)
            return str(result.state)
        finally:
            self.outcome = SUCCESS

    def applied(self) -> dict[str, list[str]]:
        """Labels applied per key, in the order they were applied."""
        by_key: dict[str, list[str]] = {}
        with self.engine.connect() as conn:
            for key, label in conn.execute(
                select(applied_table.c.ordering_key, applied_table.c.label).order_by(
                    applied_table.c.id
                )
            ):
                by_key.setdefault(key, []).append(label)
        return by_key

    def close(self) -> None:
        db: Session | None = getattr(self._local, "session", None)
        if db is not None:
            db.close()


def place(message: dict[str, Any]) -> tuple[str, int] | None:
    headers = message["headers"]
    if KEY_HEADER not in headers:
        return None
    return headers[KEY_HEADER], headers[SEQ_HEADER]


def labels(messages: list[dict[str, Any]]) -> list[str]:
    return [message["body"][0][1] for message in messages]


class Writer:
    """A transaction of its own in a thread, so that it can wait on a lock while the test
    goes on; each call returns once the thread has run it."""

    def __init__(self, engine: Engine, celery_app: Celery) -> None:
        self.tasks = TaskOutbox(celery_app)
        self.conn: Connection = engine.connect()
        self._calls: queue.Queue[Any] = queue.Queue()
        self.done: queue.Queue[object] = queue.Queue()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while (call := self._calls.get()) is not None:
            try:
                self.done.put(call())
            except Exception as e:  # handed to the test, which fails on it
                self.done.put(e)

    def submit(self, call: Any) -> None:
        self._calls.put(call)

    def enqueue(self, order_id: int, event: str) -> None:
        """Enqueue the example's notice of ``event`` for the order, keyed by it."""
        self.enqueue_task("orders.notify_customer", (order_id, event), f"order:{order_id}")

    def enqueue_task(self, name: str, args: tuple[Any, ...], key: str) -> None:
        self.submit(lambda: self.tasks.apply_async(name, args, session=self.conn, ordering_key=key))

    def result(self) -> object:
        outcome = self.done.get(timeout=20)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def close(self) -> None:
        self._calls.put(None)
        self._thread.join(timeout=5)
        self.conn.close()
