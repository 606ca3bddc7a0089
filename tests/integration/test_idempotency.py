"""Republished and concurrent deliveries on PostgreSQL apply each effect once."""

from __future__ import annotations

import threading
import uuid
from datetime import UTC, datetime, timedelta

import pytest
import redis
from celery import Celery
from sqlalchemy import Engine, func, select, text, update
from sqlalchemy.orm import Session

from outbox import (
    OutboxSettings,
    OutboxStatus,
    ProcessedMessage,
    Relay,
    TaskOutbox,
    outbox_table,
)
from tasks.orders import reserve_stock
from tests.integration.test_delivery import make_order
from tests.services import wait_for
from webapp.models import StockReservation


def reservations(engine: Engine, order_id: int) -> int:
    with Session(engine) as session:
        query = select(func.count()).where(StockReservation.order_id == order_id)
        return int(session.scalar(query) or 0)


def processed(engine: Engine, task_id: str) -> bool:
    with Session(engine) as session:
        return session.get(ProcessedMessage, task_id) is not None


def test_a_republished_task_is_applied_once(
    engine: Engine, celery_app: Celery, worker: str
) -> None:
    """A row published twice (relay died before marking) reaches the worker twice, applies once."""
    order_id = make_order(engine)
    with Session(engine) as session:
        result = TaskOutbox(celery_app).apply_async(
            reserve_stock, args=(order_id,), session=session
        )
        session.commit()
    relay = Relay(engine, celery_app)
    assert 1 == relay.drain().published
    wait_for(lambda: result.state == "SUCCESS")
    assert 1 == reservations(engine, order_id)
    # What a relay that crashed between publish and commit leaves behind: the row pending.
    with engine.begin() as conn:
        conn.execute(update(outbox_table).values(status=OutboxStatus.PENDING))
    result.forget()
    assert 1 == relay.drain().published, "the same task id is published a second time"
    # The forgotten result comes back only when the second delivery has finished.
    wait_for(lambda: result.state == "SUCCESS")
    assert result.result is None, "the repeat was recognised and skipped"
    assert 1 == reservations(engine, order_id)


@pytest.mark.postgresql
def test_a_duplicate_waits_for_the_running_delivery_then_skips(
    engine: Engine, celery_app: Celery
) -> None:
    """While one delivery holds the id uncommitted, a second blocks, then sees it and skips."""
    order_id = make_order(engine)
    task_id = str(uuid.uuid4())
    results: list[object] = []
    with Session(engine) as first:
        # Delivery one, mid-task: marker and effect written, not yet committed.
        first.add(
            ProcessedMessage(
                task_id=task_id, task_name=reserve_stock.name, processed_at=datetime.now(UTC)
            )
        )
        first.add(StockReservation(order_id=order_id, task_id=task_id, items=[]))
        first.flush()
        second = threading.Thread(
            target=lambda: results.append(
                reserve_stock.apply(args=(order_id,), task_id=task_id).get()
            )
        )
        second.start()
        wait_for(lambda: lock_waiters(engine) > 0, timeout=10)
        first.commit()
    second.join(timeout=30)
    assert [None] == results, "the second delivery skipped"
    assert 1 == reservations(engine, order_id)


def lock_waiters(engine: Engine) -> int:
    """Backends of this database waiting on a lock (the blocked duplicate)."""
    with engine.connect() as conn:
        query = text(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )
        return int(conn.execute(query).scalar_one())


@pytest.mark.postgresql
def test_redelivery_matches_processed_ids_on_postgres(
    engine: Engine, celery_app: Celery, worker: str, redis_client: redis.Redis
) -> None:
    """Past the timeout: a task the worker recorded is confirmed, one still queued is given
    more time, and one the broker no longer holds is published again."""
    order_id = make_order(engine)
    tasks = TaskOutbox(celery_app)
    queue = f"nobody-{uuid.uuid4().hex[:8]}"
    with Session(engine) as session:
        ran = tasks.apply_async(reserve_stock, args=(order_id,), session=session)
        lost = tasks.apply_async(reserve_stock, args=(order_id,), queue=queue, session=session)
        session.commit()
    relay = Relay(engine, celery_app, OutboxSettings(confirm_timeout=60))
    assert 2 == relay.drain().published
    wait_for(lambda: processed(engine, ran.id))
    later = Relay(
        engine,
        celery_app,
        OutboxSettings(confirm_timeout=60),
        clock=lambda: datetime.now(UTC) + timedelta(seconds=61),
    )
    still_queued = later.confirmation.run_once()
    assert (1, 1, 0) == (still_queued.confirmed, still_queued.extended, still_queued.republished)
    redis_client.delete(queue)  # the broker loses the message no worker consumes
    muchlater = Relay(
        engine,
        celery_app,
        OutboxSettings(confirm_timeout=60),
        clock=lambda: datetime.now(UTC) + timedelta(seconds=122),
    )
    assert 1 == muchlater.confirmation.run_once().republished, "only the task nobody has"
    with engine.connect() as conn:
        statuses = dict(conn.execute(select(outbox_table.c.task_id, outbox_table.c.status)).all())
    assert OutboxStatus.DISPATCHED == statuses[uuid.UUID(ran.id)]
    assert OutboxStatus.PENDING == statuses[uuid.UUID(lost.id)]
