"""Thousands of enqueues, some rolled back, while relays and workers are killed at random."""

from __future__ import annotations

import random
import re
import threading
import uuid
from pathlib import Path

import redis
from celery import Celery
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from outbox import TaskOutbox
from tasks.orders import reserve_stock
from tests.chaos.checks import effects_per_order, outbox_counts, queue_drained
from tests.chaos.processes import Process, pause, start_relay, start_worker
from tests.services import ChaosReport, wait_for
from webapp.models import Order

ENQUEUES = 2400
PER_TRANSACTION = 10
ROLLBACK_EVERY = 5  # every fifth transaction rolls back
#: Seconds before an unconfirmed task is published again: a worker killed between
#: popping a message from Redis and recording it as unacknowledged loses it for good.
CONFIRM_TIMEOUT = 15
RECEIVED = re.compile(r"Task orders\.reserve_stock\[[0-9a-f-]+\] received")
PUBLISHED_AGAIN = re.compile(r"(\d+) published again")


def create_orders(engine: Engine, count: int) -> list[int]:
    with Session(engine) as session:
        orders = [Order(customer_email=f"m{i}@example.com", items=[]) for i in range(count)]
        session.add_all(orders)
        session.commit()
        return [order.id for order in orders]


def test_mixed_faults_lose_nothing_apply_nothing_twice_and_no_phantoms(
    engine: Engine,
    celery_app: Celery,
    redis_client: redis.Redis,
    tmp_path: Path,
    chaos_report: ChaosReport,
) -> None:
    """Committed enqueues apply exactly once, rolled-back ones never, nothing left behind."""
    queue = f"chaos-mix-{uuid.uuid4().hex[:8]}"
    order_ids = create_orders(engine, ENQUEUES)
    committed: list[int] = []
    rolled_back: list[int] = []
    rng = random.Random(42)
    tasks = TaskOutbox(celery_app)

    def enqueue_all() -> None:
        for number, start in enumerate(range(0, ENQUEUES, PER_TRANSACTION)):
            batch = order_ids[start : start + PER_TRANSACTION]
            with Session(engine) as session:
                for order_id in batch:
                    tasks.apply_async(reserve_stock, args=(order_id,), queue=queue, session=session)
                if number % ROLLBACK_EVERY == ROLLBACK_EVERY - 1:
                    session.rollback()
                    rolled_back.extend(batch)
                else:
                    session.commit()
                    committed.extend(batch)
            pause(0.03)

    processes: dict[str, Process] = {}

    def start(name: str) -> None:
        if name.startswith("relay"):
            processes[name] = start_relay(
                f"{name}-{len(list(tmp_path.iterdir()))}",
                tmp_path,
                OUTBOX_BATCH_SIZE="50",
                OUTBOX_CONFIRM_TIMEOUT=str(CONFIRM_TIMEOUT),
            )
        else:
            processes[name] = start_worker(
                f"{name}-{len(list(tmp_path.iterdir()))}", queue, tmp_path, celery_app
            )

    kills = {"relay": 0, "worker": 0}
    try:
        for name in ("relay-a", "relay-b", "worker-a", "worker-b"):
            start(name)
        producer = threading.Thread(target=enqueue_all)
        producer.start()
        rounds = 0
        while producer.is_alive():
            pause(rng.uniform(0.3, 0.8))
            # Alternate between the relays and the workers, a random one of each.
            kind = ("relay", "worker")[rounds % 2]
            victim = rng.choice([name for name in sorted(processes) if name.startswith(kind)])
            processes[victim].kill()
            kills[kind] += 1
            start(victim)
            rounds += 1
        producer.join()
        wait_for(lambda: outbox_counts(engine) == {"dispatched": len(committed)}, timeout=60)
        wait_for(lambda: len(effects_per_order(engine)) >= len(committed), timeout=60)
        wait_for(lambda: queue_drained(redis_client, queue), timeout=60)
    finally:
        for process in processes.values():
            process.stop()
        redis_client.delete(queue)

    effects = effects_per_order(engine)
    assert ENQUEUES == len(committed) + len(rolled_back)
    assert dict.fromkeys(committed, 1) == effects, "committed: once each; rolled back: never"
    assert kills["relay"] > 0
    assert kills["worker"] > 0
    received = sum(
        len(RECEIVED.findall(path.read_text(errors="replace")))
        for path in tmp_path.glob("worker-*.log")
    )
    republished = sum(
        int(count)
        for path in tmp_path.glob("relay-*.log")
        for count in PUBLISHED_AGAIN.findall(path.read_text(errors="replace"))
    )
    chaos_report.record(
        messages=ENQUEUES,
        committed=len(committed),
        rolled_back=len(rolled_back),
        faults=f"{kills['relay']} relay and {kills['worker']} worker SIGKILLs at random",
        redelivered=received - len(committed),
        republished_unconfirmed=republished,
        lost=len(set(committed) - set(effects)),
        phantom=len(set(rolled_back) & set(effects)),
        duplicate_effects=sum(count - 1 for count in effects.values()),
    )
