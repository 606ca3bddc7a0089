"""What chaos tests measure: outbox states, applied effects, drained queues.

Every chaos test enqueues some tasks in transactions that roll back, as a request that
fails after enqueueing does, so that phantom effects (a rolled-back order's task
applied anyway) are counted, not assumed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from celery import Celery
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from outbox import TaskOutbox, outbox_table
from webapp.models import Order, StockReservation

#: Orders enqueued per transaction.
PER_TRANSACTION = 10
#: Every this many transactions, one rolls back.
ROLLBACK_EVERY = 10


@dataclass
class Orders:
    """Orders whose task was enqueued: in a transaction that committed, or rolled back."""

    committed: list[int] = field(default_factory=list)
    rolled_back: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.committed) + len(self.rolled_back)


def create_orders(engine: Engine, count: int) -> list[int]:
    """``count`` committed orders, as the API's POST /orders makes them."""
    with Session(engine) as session:
        orders = [Order(customer_email=f"c{i}@example.com", items=[]) for i in range(count)]
        session.add_all(orders)
        session.commit()
        return [order.id for order in orders]


def enqueue_orders(
    engine: Engine, celery_app: Celery, task: Any, count: int, **options: Any
) -> Orders:
    """Create ``count`` orders and enqueue ``task(order_id)`` for each, ten per
    transaction; every tenth transaction rolls back."""
    orders = Orders()
    tasks = TaskOutbox(celery_app)
    ids = create_orders(engine, count)
    for number, start in enumerate(range(0, count, PER_TRANSACTION)):
        batch = ids[start : start + PER_TRANSACTION]
        with Session(engine) as session:
            for order_id in batch:
                tasks.apply_async(task, args=(order_id,), session=session, **options)
            if number % ROLLBACK_EVERY == ROLLBACK_EVERY - 1:
                session.rollback()
                orders.rolled_back.extend(batch)
            else:
                session.commit()
                orders.committed.extend(batch)
    return orders


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


def tally(engine: Engine, orders: Orders) -> dict[str, int]:
    """Lost, phantom and duplicate effects, counted from the effects table."""
    effects = effects_per_order(engine)
    return {
        "lost": len(set(orders.committed) - set(effects)),
        "phantom": len(set(orders.rolled_back) & set(effects)),
        "duplicate_effects": sum(count - 1 for count in effects.values() if count > 1),
    }


def skipped_duplicates(worker_log: Path) -> int:
    """Deliveries the idempotent consumer recognised as repeats (from the worker's log)."""
    return worker_log.read_text(errors="replace").count("already processed: skipped")


def queue_drained(client: redis.Redis, queue: str) -> bool:
    """Nothing waiting in ``queue`` and nothing taken but unacknowledged (tasks ack late)."""
    return client.llen(queue) == 0 and client.hlen("unacked") == 0
