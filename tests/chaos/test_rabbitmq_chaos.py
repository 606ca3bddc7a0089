"""The stack on RabbitMQ, broken while it works: workers and the relay SIGKILLed, and every
connection of the virtual host closed by the broker, while orders keep coming.

The relay is ``flask --app webapp outbox relay`` and the workers ``celery -A tasks worker``,
each with ``CELERY_BROKER_URL`` pointing at this run's virtual host. Tasks are
acknowledged late, so a killed worker's messages go back to the queue at once (RabbitMQ
requeues a closed channel's unacknowledged deliveries), and the idempotent consumer skips
what it had already applied.
"""

from __future__ import annotations

import random
import uuid
from pathlib import Path

from celery import Celery
from kombu import Queue
from sqlalchemy import Engine

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
from tests.rabbitmq import close_connection, connections
from tests.services import ChaosReport, wait_for

ORDERS = 1200
ROUNDS = 4
FAULTS = ("worker SIGKILL", "relay SIGKILL", "every connection closed", "all three at once")


def test_rabbitmq_under_faults_loses_nothing_and_doubles_nothing(
    engine: Engine,
    rabbitmq_app: Celery,
    rabbitmq_url: str,
    rabbitmq_vhost: str,
    tmp_path: Path,
    chaos_report: ChaosReport,
) -> None:
    queue = f"chaos-amqp-{uuid.uuid4().hex[:8]}"
    env = {"CELERY_BROKER_URL": rabbitmq_url, "CELERY_BROKER_TRANSPORT_OPTIONS": "{}"}
    rng = random.Random(20261202)
    orders = Orders()
    started = {"worker": 0, "relay": 0}
    closed = 0
    faults_with_work_left = 0

    def worker() -> Process:
        started["worker"] += 1
        name = f"amqp-w{started['worker']}"
        # Ready when its log says so: a ping would go through this process's own
        # connections, which the broker closes too.
        return start_worker(name, queue, tmp_path, rabbitmq_app, ready_in_log=True, **env)

    def relay() -> Process:
        started["relay"] += 1
        return start_relay(f"amqp-relay{started['relay']}", tmp_path, **env)

    def close_every_connection() -> None:
        nonlocal closed
        for connection in connections(rabbitmq_vhost):
            close_connection(connection["pid"], "chaos: closed by the broker")
            closed += 1

    workers, relays = [worker()], [relay()]
    try:
        for fault in FAULTS[:ROUNDS]:
            more = enqueue_orders(
                engine, rabbitmq_app, reserve_stock, ORDERS // ROUNDS, queue=queue
            )
            orders.committed += more.committed
            orders.rolled_back += more.rolled_back
            pause(rng.uniform(0.3, 0.8))  # let the relay and workers get busy with them
            if len(effects_per_order(engine)) < len(orders.committed):
                faults_with_work_left += 1
            if fault in {"worker SIGKILL", "all three at once"}:
                workers.pop().kill()
            if fault in {"relay SIGKILL", "all three at once"}:
                relays.pop().kill()
            if fault in {"every connection closed", "all three at once"}:
                close_every_connection()
            if not workers:
                workers.append(worker())
            if not relays:
                relays.append(relay())
        committed = len(orders.committed)
        wait_for(lambda: len(effects_per_order(engine)) >= committed, timeout=120)
        wait_for(lambda: outbox_counts(engine) == {"dispatched": committed}, timeout=60)
    finally:
        for process in workers + relays:
            process.stop()
        with rabbitmq_app.connection_for_write() as conn:
            Queue(queue, channel=conn.default_channel).delete()

    logs = list(tmp_path.glob("amqp-w*.log"))
    skipped = sum(skipped_duplicates(log) for log in logs)
    counts = tally(engine, orders)
    assert {"lost": 0, "phantom": 0, "duplicate_effects": 0} == counts
    assert dict.fromkeys(orders.committed, 1) == effects_per_order(engine)
    assert closed > 0, "the broker closed connections during the traffic"
    assert ROUNDS == faults_with_work_left, "every fault landed while work was in flight"
    chaos_report.record(
        broker="rabbitmq",
        messages=len(orders),
        committed=committed,
        rolled_back=len(orders.rolled_back),
        faults=(
            f"{started['worker'] - 1} worker and {started['relay'] - 1} relay SIGKILLs, "
            f"{closed} connections closed by RabbitMQ, over {ROUNDS} rounds"
        ),
        skipped_duplicates=skipped,
        **counts,
    )
