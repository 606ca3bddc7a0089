"""How a run that does not finish is counted, on PostgreSQL, Redis and the session worker.

Only a task's own failure is consumed. A run the database failed under, a requeued
rejection and a retry are followed by another run, and that run applies the effect.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery import Celery
from sqlalchemy import Engine, func, select, text
from sqlalchemy.orm import Session

from outbox import OutboxSettings, OutboxStatus, Relay, TaskOutbox, outbox_table
from tasks.orders import reserve_stock
from tests.integration.test_delivery import make_order
from tests.services import wait_for
from webapp.models import StockReservation

WAITING_ON_A_LOCK = text(
    "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
    "AND wait_event_type = 'Lock'"
)


def waiting_on_a_lock(engine: Engine) -> list[int]:
    """Backends waiting for a lock (read on a connection of its own: a transaction sees
    one snapshot of pg_stat_activity)."""
    with engine.connect() as conn:
        return list(conn.execute(WAITING_ON_A_LOCK).scalars())


def reservations(engine: Engine, order_id: int) -> list[str]:
    """Task ids of the stock reservations applied for ``order_id``."""
    with Session(engine) as session:
        query = select(StockReservation.task_id).where(StockReservation.order_id == order_id)
        return list(session.scalars(query))


def enqueue(engine: Engine, celery_app: Celery, task: object, *args: object) -> str:
    with Session(engine) as session:
        result = TaskOutbox(celery_app).apply_async(task, args=args, session=session)
        session.commit()
    return result.id


def row(engine: Engine, task_id: str) -> dict[str, object]:
    t = outbox_table.c
    with engine.connect() as conn:
        found = conn.execute(
            select(t.status, t.deliveries, t.task_state, t.task_runs).where(
                t.task_id == uuid.UUID(task_id)
            )
        ).one()
    return dict(found._mapping)


@pytest.fixture
def order_locked(engine: Engine) -> Iterator[tuple[int, Session]]:
    """An order whose row this test holds locked, so a task writing for it has to wait."""
    order_id = make_order(engine)
    with Session(engine) as session:
        session.execute(text("SELECT id FROM orders WHERE id = :id FOR UPDATE"), {"id": order_id})
        yield order_id, session
        session.rollback()


@pytest.mark.postgresql
def test_a_task_the_database_failed_under_is_retried_and_applied(
    engine: Engine,
    celery_app: Celery,
    worker: str,
    worker_log: Path,
    order_locked: tuple[int, Session],
) -> None:
    """A task whose connection is terminated mid-run is not consumed: it is retried, and
    once the database answers again its effect is applied, once."""
    order_id, lock = order_locked
    task_id = enqueue(engine, celery_app, reserve_stock, order_id)
    assert 1 == Relay(engine, celery_app).drain().published
    # The task's INSERT checks its order's key and waits for this test's lock: its
    # backend is the one waiting. Terminate it, as a database restart would.
    [waiting] = wait_for(lambda: waiting_on_a_lock(engine))
    lock.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": waiting})
    lock.rollback()

    assert [task_id] == wait_for(lambda: reservations(engine, order_id))
    log = worker_log.read_text(errors="replace")
    assert f"orders.reserve_stock[{task_id}] could not reach the database" in log
    wait_for(lambda: 2 == row(engine, task_id)["task_runs"])
    assert {"status": OutboxStatus.DISPATCHED, "task_state": "SUCCESS"}.items() <= row(
        engine, task_id
    ).items()


def test_a_rejected_and_requeued_task_runs_again(
    engine: Engine, celery_app: Celery, worker: str
) -> None:
    """Reject(requeue=True) hands the message back: the next delivery applies the effect."""
    order_id = make_order(engine)
    task_id = enqueue(engine, celery_app, "tests.reject_once", order_id)
    assert 1 == Relay(engine, celery_app).drain().published
    assert [task_id] == wait_for(lambda: reservations(engine, order_id))


def test_a_retry_longer_than_the_confirm_timeout_is_not_published_again(
    engine: Engine, celery_app: Celery, worker: str
) -> None:
    """self.retry(countdown=3) with a 1 s confirmation timeout: the recorded retry keeps
    the task alive until its countdown is due, so it is published once and applied once."""
    order_id = make_order(engine)
    task_id = enqueue(engine, celery_app, "tests.retry_once_later", order_id, 3)
    relay = Relay(engine, celery_app, OutboxSettings(confirm_timeout=1))
    assert 1 == relay.drain().published
    republished = []

    def applied() -> list[str]:
        republished.append(relay.confirmation.run_once().republished)
        relay.drain()
        return reservations(engine, order_id)

    assert [task_id] == wait_for(applied, interval=0.2)
    assert 0 == sum(republished), "the retrying task was not published again"
    assert 1 == row(engine, task_id)["deliveries"]
    with Session(engine) as session:
        count = session.scalar(select(func.count()).where(StockReservation.order_id == order_id))
    assert 1 == count
