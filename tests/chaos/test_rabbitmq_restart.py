"""A RabbitMQ node of the test's own, SIGKILLed and restarted, then stopped and restarted,
while orders flow through it.

RabbitMQ writes a persistent message to a durable queue before it confirms the publish,
and the relay marks a row dispatched only once confirmed: nothing the relay marked is
lost by a crash. What the broker had not confirmed stays pending and is published again
after the restart; deliveries a worker held unacknowledged go back to the queue and are
delivered again, and the idempotent consumer skips what it had applied. The relays notice
the restarts (the transient marker queue they planted is gone; the test waits for a node
instance they had not recorded) without republishing what the node kept.

Each fault is made to land on work in flight rather than hoped to: once the worker is
applying a wave, the worker is frozen (SIGSTOP, its pool with it) and more orders are
committed, which nothing can apply before the node goes down. The worker is let go once
the node is down, so it finds its connection gone and reconnects while the node boots.
"""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

from sqlalchemy import Engine, select

from outbox.data.schema import brokers_table
from tasks.orders import reserve_stock
from tests.chaos.checks import (
    Orders,
    effects_per_order,
    enqueue_orders,
    outbox_counts,
    skipped_duplicates,
    tally,
)
from tests.chaos.processes import Process, start_relay, start_worker
from tests.chaos.rabbitmq_node import rabbitmq_node
from tests.services import ChaosReport, app_on, wait_for

ORDERS = 600
FAULTS = ("node SIGKILLed", "node stopped")
#: Orders of each fault's wave committed while the worker is frozen, just before the fault.
HELD_BACK = 50


def run_ids(engine: Engine, port: int) -> set[str]:
    """The node instances the relays have recorded for the test's broker."""
    query = select(brokers_table.c.run_id).where(brokers_table.c.broker.contains(f":{port}"))
    with engine.connect() as conn:
        return {run_id for run_id in conn.execute(query).scalars() if run_id}


def applied_any(engine: Engine, order_ids: Collection[int]) -> bool:
    """Whether the worker has applied the task of one of ``order_ids``."""
    return not set(order_ids).isdisjoint(effects_per_order(engine))


@contextmanager
def frozen(worker: Process) -> Iterator[None]:
    """The worker and its pool stopped (SIGSTOP) where they are, deliveries in hand,
    until the block ends (SIGCONT)."""
    os.killpg(worker.popen.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.killpg(worker.popen.pid, signal.SIGCONT)


def test_a_restarted_node_loses_nothing_and_doubles_nothing(
    engine: Engine, tmp_path: Path, chaos_report: ChaosReport
) -> None:
    """Every order committed is applied once however the node goes down with work in
    flight, and no rolled-back one is applied."""
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
                wave = enqueue_orders(
                    engine, app, reserve_stock, ORDERS // len(FAULTS) - HELD_BACK, queue=queue
                )
                orders.committed += wave.committed
                orders.rolled_back += wave.rolled_back
                # The relays record the node they publish to at their maintenance pass.
                seen_runs.append(wait_for(lambda: run_ids(engine, node.port), timeout=60))
                # Through the node and into the worker: the relay publishes, the worker
                # (back after the previous fault) consumes.
                wait_for(partial(applied_any, engine, wave.committed), timeout=120)
                with frozen(worker):
                    held = enqueue_orders(engine, app, reserve_stock, HELD_BACK, queue=queue)
                    assert held.committed, "some held-back orders committed"
                    orders.committed += held.committed
                    orders.rolled_back += held.rolled_back
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
