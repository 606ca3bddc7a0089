"""A RabbitMQ node of the test's own, SIGKILLed and restarted, then stopped and restarted,
while orders flow through it.

RabbitMQ writes a persistent message to a durable queue before it confirms the publish,
and the relay marks a row dispatched only once confirmed: nothing the relay marked is
lost by a crash. What the broker had not confirmed stays pending and is published again
after the restart; deliveries a worker held unacknowledged go back to the queue and are
delivered again, and the idempotent consumer skips what it had applied. The relays notice
the restarts (the transient marker queue they planted is gone; the test waits for a node
instance they had not recorded) without republishing what the node kept.
"""

from __future__ import annotations

import random
import uuid
from pathlib import Path

from sqlalchemy import Engine, select

from outbox.schema import brokers_table
from tasks.orders import reserve_stock
from tests.chaos.checks import (
    Orders,
    effects_per_order,
    enqueue_orders,
    outbox_counts,
    skipped_duplicates,
    tally,
)
from tests.chaos.processes import Process, pause, start_relay, start_worker
from tests.chaos.rabbitmq_node import rabbitmq_node
from tests.services import ChaosReport, app_on, wait_for

ORDERS = 600
FAULTS = ("node SIGKILLed", "node stopped")


def run_ids(engine: Engine, port: int) -> set[str]:
    """The node instances the relays have recorded for the test's broker."""
    query = select(brokers_table.c.run_id).where(brokers_table.c.broker.contains(f":{port}"))
    with engine.connect() as conn:
        return {run_id for run_id in conn.execute(query).scalars() if run_id}


def test_a_restarted_node_loses_nothing_and_doubles_nothing(
    engine: Engine, tmp_path: Path, chaos_report: ChaosReport
) -> None:
    rng = random.Random(20261203)
    queue = f"chaos-restart-{uuid.uuid4().hex[:8]}"
    orders = Orders()
    with rabbitmq_node(tmp_path) as node:
        app = app_on(node.url, "outbox-restart-test")
        env = {"CELERY_BROKER_URL": node.url, "CELERY_BROKER_TRANSPORT_OPTIONS": "{}"}
        worker = start_worker("restart-w1", queue, tmp_path, app, ready_in_log=True, **env)
        relays: list[Process] = [start_relay("restart-relay1", tmp_path, **env)]
        seen_runs: list[set[str]] = []
        faults_with_work_left = 0
        try:
            for fault in FAULTS:
                more = enqueue_orders(
                    engine, app, reserve_stock, ORDERS // len(FAULTS), queue=queue
                )
                orders.committed += more.committed
                orders.rolled_back += more.rolled_back
                # The relays record the node they publish to at their maintenance pass.
                seen_runs.append(wait_for(lambda: run_ids(engine, node.port), timeout=60))
                pause(rng.uniform(0.3, 0.8))  # let the relay and the worker get busy
                if len(effects_per_order(engine)) < len(orders.committed):
                    faults_with_work_left += 1
                if fault == "node SIGKILLed":
                    node.kill()
                else:
                    node.stop()
                node.start()
            committed = len(orders.committed)
            wait_for(lambda: len(effects_per_order(engine)) >= committed, timeout=180)
            wait_for(lambda: outbox_counts(engine) == {"dispatched": committed}, timeout=60)
            # A restart noticed: a node instance the relays had not recorded before.
            wait_for(lambda: run_ids(engine, node.port) - set().union(*seen_runs), timeout=60)
        finally:
            for process in [worker, *relays]:
                process.stop()

    counts = tally(engine, orders)
    assert {"lost": 0, "phantom": 0, "duplicate_effects": 0} == counts
    assert dict.fromkeys(orders.committed, 1) == effects_per_order(engine)
    assert len(FAULTS) == faults_with_work_left, "every restart came while work was in flight"
    assert 3 == node.starts
    chaos_report.record(
        broker="rabbitmq (a node of its own)",
        messages=len(orders),
        committed=committed,
        rolled_back=len(orders.rolled_back),
        faults="the node SIGKILLed and restarted, then stopped and restarted, with work in flight",
        skipped_duplicates=skipped_duplicates(tmp_path / "restart-w1.log"),
        **counts,
    )
