"""A relay killed between publishing and marking: republished, same ids, applied once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import redis
from celery import Celery
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from outbox import OutboxStatus, ProcessedMessage, TaskOutbox, outbox_table
from outbox.contrib.flask import CRASH_AFTER_PUBLISHES_KEY, CRASH_EXIT_CODE
from tasks.orders import reserve_stock
from tests.services import ROOT, wait_for
from webapp.models import Order, StockReservation

ORDERS = 100
CRASH_AFTER = 30


def start_relay(**env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "flask",
            "--app",
            "webapp",
            "outbox",
            "relay",
            "--poll-interval",
            "0.2",
        ],
        cwd=ROOT,
        env={**os.environ, "OUTBOX_BATCH_SIZE": "50", **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def count(engine: Engine, query: object) -> int:
    with Session(engine) as session:
        return int(session.scalar(query) or 0)  # type: ignore[call-overload]


def test_relay_killed_after_publishing_before_marking(
    engine: Engine, celery_app: Celery, worker: str, redis_client: redis.Redis
) -> None:
    """The crashed batch stays pending; a new relay republishes it; each effect lands once."""
    with Session(engine) as session:
        orders = [Order(customer_email=f"c{i}@example.com", items=[]) for i in range(ORDERS)]
        session.add_all(orders)
        session.flush()
        order_ids = [order.id for order in orders]
        tasks = TaskOutbox(celery_app)
        for order_id in order_ids:
            tasks.apply_async(reserve_stock, args=(order_id,), session=session)
        session.commit()

    crashing = start_relay(**{CRASH_AFTER_PUBLISHES_KEY: str(CRASH_AFTER)})
    output, _ = crashing.communicate(timeout=60)
    assert CRASH_EXIT_CODE == crashing.returncode, output
    pending = select(func.count()).where(outbox_table.c.status == OutboxStatus.PENDING)
    assert ORDERS == count(engine, pending), "the crashed batch was never marked"
    # The crashed relay's messages really reached the broker before it died.
    wait_for(lambda: count(engine, select(func.count()).select_from(ProcessedMessage)) > 0)

    relay = start_relay()
    try:
        dispatched = select(func.count()).where(outbox_table.c.status == OutboxStatus.DISPATCHED)
        wait_for(lambda: count(engine, dispatched) == ORDERS, timeout=30)
    finally:
        relay.send_signal(signal.SIGTERM)
        relay.communicate(timeout=20)

    processed = select(func.count()).select_from(ProcessedMessage)
    wait_for(lambda: count(engine, processed) == ORDERS, timeout=60)
    # Every message, first deliveries and republished duplicates alike, has been taken
    # (queue empty) and acknowledged (kombu's unacked hash empty: tasks are acks_late).
    wait_for(
        lambda: redis_client.llen("celery") == 0 and redis_client.hlen("unacked") == 0,
        timeout=60,
    )
    reservations = select(StockReservation.order_id, func.count()).group_by(
        StockReservation.order_id
    )
    with Session(engine) as session:
        per_order = dict(session.execute(reservations).all())
    assert dict.fromkeys(order_ids, 1) == per_order
