"""Workers SIGKILLed mid-stream with acks_late: messages come back, effects land once."""

from __future__ import annotations

import random
import re
import uuid
from pathlib import Path

import redis
from celery import Celery
from sqlalchemy import Engine

from outbox import Relay
from tasks.orders import reserve_stock
from tests.chaos.checks import effects_per_order, enqueue_orders, queue_drained, tally
from tests.chaos.processes import pause, start_worker
from tests.services import ChaosReport, wait_for

#: Enough that the workers are still busy at the last kill on a fast machine too (at
#: 1,500 they once finished before it).
ORDERS = 3000
KILLS = 4
RECEIVED = re.compile(r"Task orders\.reserve_stock\[[0-9a-f-]+\] received")


def test_workers_killed_mid_task_apply_each_effect_once(
    engine: Engine,
    celery_app: Celery,
    redis_client: redis.Redis,
    tmp_path: Path,
    chaos_report: ChaosReport,
) -> None:
    """Killing the worker group repeatedly while it works loses nothing and doubles nothing."""
    queue = f"chaos-workers-{uuid.uuid4().hex[:8]}"
    orders = enqueue_orders(engine, celery_app, reserve_stock, ORDERS, queue=queue)
    committed = len(orders.committed)
    # Kombu's Redis transport can lose a message whose worker dies between popping it and
    # recording it as unacknowledged; the outbox, with its default settings, finds such a
    # task neither queued nor held and publishes it again.
    relay = Relay(engine, celery_app)
    assert committed == relay.drain(max_seconds=60).published

    republished: list[int] = []
    rng = random.Random(20261127)
    killed_with_work_left = 0
    try:
        for round_ in range(KILLS):
            worker = start_worker(f"chaos-w{round_}", queue, tmp_path, celery_app)
            pause(rng.uniform(0.2, 0.6))
            if len(effects_per_order(engine)) < committed:
                killed_with_work_left += 1
            worker.kill()
        last = start_worker("chaos-w-last", queue, tmp_path, celery_app)
        try:
            wait_for(
                lambda: (
                    republished.append(relay.drain().redelivered)
                    or len(effects_per_order(engine)) == committed
                ),
                timeout=90,
            )
            wait_for(lambda: queue_drained(redis_client, queue), timeout=30)
        finally:
            last.stop()
    finally:
        redis_client.delete(queue)

    assert dict.fromkeys(orders.committed, 1) == effects_per_order(engine)
    assert KILLS == killed_with_work_left, "every kill landed while work was in flight"
    logs = [path.read_text(errors="replace") for path in tmp_path.glob("chaos-w*.log")]
    received = sum(len(RECEIVED.findall(log)) for log in logs)
    redelivered = received - committed
    assert redelivered > 0, "killed workers held messages that had to be delivered again"
    chaos_report.record(
        messages=ORDERS,
        committed=committed,
        rolled_back=len(orders.rolled_back),
        faults=f"worker group SIGKILLed {KILLS} times mid-stream",
        redelivered=redelivered,
        republished_unconfirmed=sum(republished),
        **tally(engine, orders),
    )
