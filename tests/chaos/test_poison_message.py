"""A poison row beside healthy ones: the healthy flow, the poison dies, retry-dead revives it."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

from celery import Celery
from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session

from outbox import OutboxStatus, outbox_table
from tasks.orders import reserve_stock
from tests.chaos.checks import effects_per_order, enqueue_orders, tally
from tests.chaos.processes import start_relay
from tests.services import ROOT, ChaosReport, insert_pending_row, wait_for
from webapp.models import Order, StockReservation

HEALTHY = 200
MAX_ATTEMPTS = 3
FAST_RETRIES = {
    "OUTBOX_MAX_ATTEMPTS": str(MAX_ATTEMPTS),
    "OUTBOX_RETRY_BACKOFF": "0.2",
    "OUTBOX_RETRY_BACKOFF_MAX": "0.4",
}


def row(engine: Engine, task_id: uuid.UUID) -> dict[str, object]:
    t = outbox_table.c
    with engine.connect() as conn:
        found = conn.execute(
            select(t.status, t.attempts, t.last_error).where(t.task_id == task_id)
        ).one()
    return {"status": found.status, "attempts": found.attempts, "last_error": found.last_error}


def test_poison_row_dies_alone_and_retry_dead_revives_it(
    engine: Engine, celery_app: Celery, worker: str, tmp_path: Path, chaos_report: ChaosReport
) -> None:
    """Healthy rows dispatch; the poison goes dead after MAX_ATTEMPTS; retry-dead revives it."""
    with Session(engine) as session:
        poisoned_order = Order(customer_email="poison@example.com", items=[])
        session.add(poisoned_order)
        session.commit()
        poisoned_order_id = poisoned_order.id
    poison_id = insert_pending_row(engine, "orders.removed_in_last_deploy", [poisoned_order_id])
    orders = enqueue_orders(engine, celery_app, reserve_stock, HEALTHY)
    healthy = len(orders.committed)
    relay = start_relay("relay", tmp_path, OUTBOX_BATCH_SIZE="25", **FAST_RETRIES)
    try:
        wait_for(lambda: len(effects_per_order(engine)) == healthy, timeout=30)
        wait_for(lambda: row(engine, poison_id)["status"] == OutboxStatus.DEAD, timeout=20)
        dead = row(engine, poison_id)
        assert MAX_ATTEMPTS == dead["attempts"]
        assert "'orders.removed_in_last_deploy' is not registered" in str(dead["last_error"])

        # The operator's fix: the task was renamed; point the row at the new name, revive it.
        with engine.begin() as conn:
            conn.execute(
                update(outbox_table)
                .where(outbox_table.c.task_id == poison_id)
                .values(task_name=reserve_stock.name)
            )
        revive = subprocess.run(
            [
                sys.executable,
                "-m",
                "flask",
                "--app",
                "webapp",
                "outbox",
                "retry-dead",
                "--id",
                str(poison_id),
            ],
            cwd=ROOT,
            env=os.environ.copy(),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert 0 == revive.returncode, revive.stderr
        assert "1 dead row(s) back to pending" in revive.stdout
        wait_for(lambda: row(engine, poison_id)["status"] == OutboxStatus.DISPATCHED, timeout=20)
    finally:
        relay.stop()
    assert relay.popen.returncode == 0, relay.log()
    wait_for(lambda: poisoned_order_id in effects_per_order(engine), timeout=20)
    effects = effects_per_order(engine)
    assert dict.fromkeys([poisoned_order_id, *orders.committed], 1) == effects
    with Session(engine) as session:
        applied_by = session.scalar(
            select(StockReservation.task_id).where(StockReservation.order_id == poisoned_order_id)
        )
    assert str(poison_id) == applied_by, "the revived row kept its task id"
    orders.committed.append(poisoned_order_id)
    chaos_report.record(
        messages=HEALTHY + 1,
        committed=len(orders.committed),
        rolled_back=len(orders.rolled_back),
        faults="one row for an unregistered task among healthy rows",
        poison_attempts=dead["attempts"],
        delivered=len(effects),
        **tally(engine, orders),
    )
