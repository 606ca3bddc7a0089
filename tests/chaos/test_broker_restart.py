"""Redis restarted without persistence loses every queued message: the relay notices the
restart within seconds and publishes every unconfirmed task again.

Nothing consumes the queue until after the restart, so every task is on the broker when
it loses them. The relay runs as ``flask outbox relay`` with the example's default
settings (its confirmation timeout is an hour, which is how long it took before).
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

from celery import Celery
from sqlalchemy import Engine, func, select

from outbox import outbox_table
from outbox.schema import brokers_table
from tasks.orders import reserve_stock
from tests.chaos.checks import effects_per_order, enqueue_orders, outbox_counts, tally
from tests.chaos.processes import start_relay, start_worker, stop_all
from tests.chaos.redis_server import redis_server
from tests.services import ChaosReport, wait_for

ORDERS = 300


def remembered_brokers(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(brokers_table)).scalar_one())


def test_a_broker_that_lost_its_data_gets_every_unconfirmed_task_again(
    engine: Engine, celery_app: Celery, tmp_path: Path, chaos_report: ChaosReport
) -> None:
    """Restart the broker empty: the relay republishes all its tasks; each applies once."""
    queue = f"chaos-restart-{uuid.uuid4().hex[:8]}"
    with redis_server(tmp_path, persistent=False) as broker:
        env = {"CELERY_BROKER_URL": broker.url, "CELERY_RESULT_BACKEND": broker.url}
        orders = enqueue_orders(engine, celery_app, reserve_stock, ORDERS, queue=queue)
        committed = len(orders.committed)
        processes = [start_relay("relay", tmp_path, **env)]
        try:
            wait_for(lambda: {"dispatched": committed} == outbox_counts(engine))
            wait_for(lambda: committed == broker.client.llen(queue))
            # The relay has recorded which broker it publishes to: the restart can be told.
            wait_for(lambda: remembered_brokers(engine))

            broker.kill()
            broker.start()
            restarted_at = time.monotonic()
            lost = committed - broker.client.llen(queue)
            wait_for(lambda: committed == broker.client.llen(queue), timeout=60)
            republished_seconds = time.monotonic() - restarted_at

            processes.append(
                start_worker(
                    "chaos-restart-worker", queue, tmp_path, celery_app, ready_in_log=True, **env
                )
            )
            wait_for(lambda: committed == len(effects_per_order(engine)), timeout=60)
            applied_seconds = time.monotonic() - restarted_at
            relay_log = processes[0].log()
        finally:
            stop_all(processes)
    assert dict.fromkeys(orders.committed, 1) == effects_per_order(engine)
    assert committed == lost, "the restart lost every queued message"
    assert "lost its data (restarted at" in relay_log
    with engine.connect() as conn:
        deliveries = conn.execute(select(outbox_table.c.deliveries).distinct()).scalars().all()
    assert [2] == deliveries, "each task was published once more, not more"
    chaos_report.record(
        messages=ORDERS,
        committed=committed,
        rolled_back=len(orders.rolled_back),
        faults="redis-server without persistence restarted with every task queued",
        lost_by_the_broker=lost,
        republished_seconds_after_restart=round(republished_seconds, 1),
        applied_seconds_after_restart=round(applied_seconds, 1),
        **tally(engine, orders),
    )
