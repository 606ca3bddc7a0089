"""What chaos tests measure: outbox states, applied effects, drained queues."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import redis
from celery import Celery
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from outbox import TaskOutbox, outbox_table
from webapp.models import Order, StockReservation


def enqueue_orders(
    engine: Engine, celery_app: Celery, task: Any, count: int, **options: Any
) -> list[int]:
    """Create ``count`` orders and enqueue ``task(order_id)`` for each, in one commit."""
    with Session(engine) as session:
        orders = [Order(customer_email=f"c{i}@example.com", items=[]) for i in range(count)]
        session.add_all(orders)
        session.flush()
        order_ids = [order.id for order in orders]
        tasks = TaskOutbox(celery_app)
        for order_id in order_ids:
            tasks.apply_async(task, args=(order_id,), session=session, **options)
        session.commit()
    return order_ids


def outbox_counts(engine: Engine) -> dict[str, int]:
    """Rows per status, e.g. ``{"dispatched": 100}``."""
    query = select(outbox_table.c.status, func.count()).group_by(outbox_table.c.status)
    with engine.connect() as conn:
        return {str(status): count for status, count in conn.execute(query)}


def effects_per_order(engine: Engine) -> dict[int, int]:
    """How many stock reservations each order got."""
    query = select(StockReservation.order_id, func.count()).group_by(StockReservation.order_id)
    with Session(engine) as session:
        return dict(session.execute(query).all())


def skipped_duplicates(worker_log: Path) -> int:
    """Deliveries the idempotent consumer recognised as repeats (from the worker's log)."""
    return worker_log.read_text(errors="replace").count("already processed: skipped")


def queue_drained(client: redis.Redis, queue: str) -> bool:
    """Nothing waiting in ``queue`` and nothing taken but unacknowledged (tasks ack late)."""
    return client.llen(queue) == 0 and client.hlen("unacked") == 0
