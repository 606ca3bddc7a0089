"""The stage the accidents play on: the embedded default, in a folder of its own.

A SQLite database with the example's tables, the demo's filesystem broker (``broker``),
a Celery app with two versions of the customer's notice, a real Celery worker with four
threads, and the outbox with its relay, polling as on SQLite. Nothing outside the folder
is read or written, whatever the environment points the example at.

The two notices apply the same effect (a row in ``notifications``) after a simulated
sending latency. ``notify`` is a task as written for ``.delay()``: it commits on its own.
``notify_once`` is the same task as written for the outbox: an idempotent consumer.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from celery import Celery
from celery.contrib.testing.worker import start_worker
from celery.signals import task_postrun
from sqlalchemy import create_engine, event, func, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, scoped_session, sessionmaker

from outbox import OutboxSettings, OutboxStatus, Relay, TaskOutbox, create_tables, idempotent
from outbox import outbox_table as _outbox
from outbox.relays.loop import RelayLoop
from webapp.accidents.broker import FAULTS
from webapp.extensions import db
from webapp.models import Notification, Order, OrderStatus

#: The worker's threads: the concurrent workers that overtake one another.
WORKER_THREADS = 4
#: Seconds the relay waits between polls (SQLite cannot wake it).
POLL_INTERVAL = 0.02
#: Longest wait for the tasks of one scenario to have run.
SETTLE_TIMEOUT = 30.0


@dataclass
class Stage:
    directory: Path
    #: The longest simulated send, in milliseconds.
    latency_ms: float
    engine: Engine = field(init=False)
    celery_app: Celery = field(init=False)
    outbox: TaskOutbox = field(init=False)
    #: Notices that must ask to be retried on their first run: (order id, event).
    retry_once: set[tuple[int, str]] = field(default_factory=set)
    #: Runs of this stage's tasks, counted against the messages written since it began
    #: (the counts of a scenario's phases would not do: a phase starts before the last
    #: one's runs are all counted in).
    _runs: int = 0
    _written_before: int = field(init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self._written_before = FAULTS.written_ever
        self.engine = create_engine(
            f"sqlite:///{self.directory / 'accidents.sqlite3'}", connect_args={"timeout": 30}
        )
        event.listen(self.engine, "connect", _wal)
        db.metadata.create_all(self.engine)
        create_tables(self.engine)
        self.sessions = scoped_session(sessionmaker(self.engine))
        self.celery_app = self._celery_app()
        self.outbox = TaskOutbox(self.celery_app)

    # -- the Celery side -----------------------------------------------------------

    def _celery_app(self) -> Celery:
        queue, control = self.directory / "broker", self.directory / "control"
        queue.mkdir()
        control.mkdir()
        app = Celery("accidents", set_as_current=False)
        url = "outbox-demo://"
        app.conf.update(
            # Read and write URLs set apart from broker_url, which CELERY_BROKER_URL in
            # the environment would override.
            broker_read_url=url,
            broker_write_url=url,
            broker_transport_options={
                "data_folder_in": str(queue),
                "data_folder_out": str(queue),
                "control_folder": str(control),
                "polling_interval": 0.01,
            },
            result_backend="disabled://",
            task_ignore_result=True,
            task_serializer="json",
            accept_content=["json"],
            # Celery retries a failed publish: a few times, quickly.
            task_publish_retry_policy={
                "max_retries": 3,
                "interval_start": 0,
                "interval_step": 0.05,
                "interval_max": 0.1,
            },
            worker_hijack_root_logger=False,
        )
        stage = self

        @app.task(name="accidents.notify", bind=True, acks_late=True)
        def notify(task: Any, order_id: int, event: str) -> None:
            stage._ask_for_retry(task, order_id, event)
            stage._send()
            with Session(stage.engine) as session:
                session.add(stage._notice(session, order_id, event, task.request.id))
                session.commit()

        @app.task(name="accidents.notify_once", bind=True, acks_late=True)
        @idempotent(lambda: stage.sessions, transient_retries=3)
        def notify_once(task: Any, order_id: int, event: str) -> None:
            stage._ask_for_retry(task, order_id, event)
            stage._send()
            stage.sessions.add(stage._notice(stage.sessions, order_id, event, task.request.id))

        return app

    def _notice(self, session: Any, order_id: int, event: str, task_id: str) -> Notification:
        order = session.get(Order, order_id)
        return Notification(
            order_id=order_id, task_id=task_id, recipient=order.customer_email, event=event
        )

    def _ask_for_retry(self, task: Any, order_id: int, event: str) -> None:
        if (order_id, event) in self.retry_once and task.request.retries == 0:
            raise task.retry(countdown=0.05)

    def _send(self) -> None:
        if self.latency_ms > 0:
            time.sleep(random.uniform(0, self.latency_ms) / 1000)  # noqa: S311 - a simulation

    @contextlib.contextmanager
    def running(self) -> Iterator[Stage]:
        """The worker and the relay, running."""
        task_postrun.connect(self._count_run, weak=False)
        relay = Relay(
            self.engine,
            self.celery_app,
            # A failed publish is tried again within a fraction of a second.
            OutboxSettings(retry_backoff=0.05, retry_backoff_max=0.2),
        )
        loop = RelayLoop(relay, poll_interval=POLL_INTERVAL)
        relay_thread = threading.Thread(target=loop.run, name="accidents-relay", daemon=True)
        try:
            with start_worker(
                self.celery_app,
                pool="threads",
                concurrency=WORKER_THREADS,
                perform_ping_check=False,
                loglevel="CRITICAL",
            ):
                relay_thread.start()
                yield self
        finally:
            loop.stop()
            relay_thread.join(timeout=10)
            task_postrun.disconnect(self._count_run)
            self.sessions.remove()
            self.engine.dispose()

    def _count_run(self, sender: Any = None, **_: Any) -> None:
        if getattr(sender, "app", None) is self.celery_app:
            with self._lock:
                self._runs += 1

    # -- what happened ---------------------------------------------------------------

    def settle(self) -> None:
        """Wait until every message the broker took has been run, and nothing waits in
        the outbox (pending, or held behind its key)."""
        deadline = time.monotonic() + SETTLE_TIMEOUT
        while time.monotonic() < deadline:
            with self._lock:
                runs = self._runs
            if runs >= self._written() and not self.waiting_in_outbox():
                return
            time.sleep(0.02)
        raise TimeoutError(
            f"the tasks did not all run within {SETTLE_TIMEOUT:g}s "
            f"({self._runs} runs of {self._written()} messages, "
            f"{self.waiting_in_outbox()} rows waiting in the outbox)"
        )

    def _written(self) -> int:
        return FAULTS.written_ever - self._written_before

    def waiting_in_outbox(self) -> int:
        with self.engine.connect() as conn:
            return int(
                conn.execute(
                    select(func.count()).where(
                        _outbox.c.status.in_([OutboxStatus.PENDING, OutboxStatus.HELD])
                    )
                ).scalar_one()
            )

    def new_order(self, number: int) -> int:
        with Session(self.engine) as session:
            order = Order(
                customer_email=f"customer{number}@example.com",
                items=[{"sku": "BOOK-1", "qty": 1}],
                status=OrderStatus.PENDING.value,
            )
            session.add(order)
            session.commit()
            return order.id

    def advance(
        self, order_id: int, status: OrderStatus, enqueue: Callable[[Session], Any]
    ) -> None:
        """One request: set the order's status and call ``enqueue``, in one transaction
        (``enqueue`` may publish after the commit instead, as a ``.delay()`` view does)."""
        with Session(self.engine) as session:
            order = session.get_one(Order, order_id)
            order.status = status.value
            enqueue(session)

    def notices(self) -> dict[int, list[str]]:
        """Each order's notices, in the order they were applied."""
        by_order: dict[int, list[str]] = {}
        with Session(self.engine) as session:
            for order_id, event_name in session.execute(
                select(Notification.order_id, Notification.event).order_by(Notification.id)
            ):
                by_order.setdefault(order_id, []).append(event_name)
        return by_order


def _wal(dbapi_connection: Any, _record: Any) -> None:
    # Readers do not wait for the worker's writes.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.close()
