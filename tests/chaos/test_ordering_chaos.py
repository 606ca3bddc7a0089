"""Confirmed, shipped, delivered: each order's notices reach the customer in that order,
while workers and the relay are SIGKILLed.

The example's stack runs as in ``test_mixed_faults`` (gunicorn, two plain workers, beat
and the relay) with a simulated sending latency (``ORDERS_TASK_LATENCY_MS``), so that on
two workers of two processes each, unordered notices overtake one another. Clients take
each order through confirm, ship and deliver back to back over HTTP. Workers and the
relay are SIGKILLed meanwhile; the workers redeliver what a killed worker held after two
seconds (the chaos tests' transport options) instead of the example's minute, to keep
the run short.

Run once with the notices ordered by their order (the example's default) and once with
``ORDERS_ORDERED_NOTIFICATIONS=false``: the second run must show out-of-order timelines,
which proves the first run's zero is measured by a check that can see them.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from tests.chaos.processes import FAST_REDELIVERY, pause
from tests.chaos.redis_server import RedisServer, free_port, redis_server
from tests.chaos.test_mixed_faults import Clients, Stack, ping
from tests.services import ChaosReport, wait_for
from webapp.models import Notification, Order, OrderStatus

ORDERS = 500
CLIENTS = 4
#: The simulated send: a random wait of up to this many milliseconds a task.
LATENCY_MS = 20
TIMELINE = ["confirmed", "shipped", "delivered"]
#: From the end of the traffic until every order's three notices are applied.
DRAIN_WITHIN = 120


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[RedisServer]:
    with redis_server(tmp_path, persistent=False) as server:
        yield server


def timelines(engine: Engine) -> dict[int, list[str]]:
    """Each delivered order's notices, in the order they were applied."""
    with Session(engine) as session:
        delivered = set(
            session.scalars(select(Order.id).where(Order.status == OrderStatus.DELIVERED))
        )
        by_order: dict[int, list[str]] = {order_id: [] for order_id in delivered}
        for order_id, event in session.execute(
            select(Notification.order_id, Notification.event).order_by(Notification.id)
        ):
            if order_id in by_order:
                by_order[order_id].append(event)
    return by_order


def all_noticed(engine: Engine) -> bool:
    return all(len(events) >= len(TIMELINE) for events in timelines(engine).values())


@pytest.mark.timeout(300)
@pytest.mark.parametrize("ordered", [True, False], ids=["ordered", "unordered"])
def test_every_delivered_order_hears_confirmed_shipped_delivered_in_that_order(
    ordered: bool,
    engine: Engine,
    broker: RedisServer,
    database_url: str,
    tmp_path: Path,
    chaos_report: ChaosReport,
) -> None:
    env = {
        "DATABASE_URL": database_url,
        "CELERY_BROKER_URL": broker.url,
        "CELERY_RESULT_BACKEND": broker.url,
        "CELERY_BROKER_TRANSPORT_OPTIONS": json.dumps(FAST_REDELIVERY),
        "ORDERS_TASK_LATENCY_MS": str(LATENCY_MS),
        "ORDERS_ORDERED_NOTIFICATIONS": "true" if ordered else "false",
    }
    stack = Stack(tmp_path, env, free_port())
    clients = Clients(f"http://127.0.0.1:{stack.port}")
    rng = random.Random(20261203)
    faults: Counter[str] = Counter()

    def customer(number: int) -> None:
        for i in range(number, ORDERS, CLIENTS):
            order = clients.call("POST", "/orders", {
                "customer_email": f"c{i}@example.com", "items": [{"sku": "BOOK-1", "qty": 1}],
            })  # fmt: skip
            for step in ("confirm", "ship", "deliver"):
                clients.call("POST", f"/orders/{order['id']}/{step}")

    schedule = ["worker-a", "relay", "worker-b", "worker-a", "relay", "worker-b"]
    try:
        for name in ("web", "worker-a", "worker-b", "beat", "relay"):
            stack.start(name)
        wait_for(lambda: stack.supervise() or ping(clients.base), timeout=60)
        customers = [threading.Thread(target=customer, args=(n,)) for n in range(CLIENTS)]
        started = time.monotonic()
        for thread in customers:
            thread.start()
        for name in schedule:
            pause(rng.uniform(1.5, 3.0))
            stack.supervise()
            stack.kill(name)
            faults[f"{name.split('-')[0]} SIGKILL"] += 1
        while any(thread.is_alive() for thread in customers):
            stack.supervise()
            pause(0.2)
        traffic_seconds = time.monotonic() - started
        wait_for(
            lambda: stack.supervise() or all_noticed(engine), timeout=DRAIN_WITHIN, interval=0.5
        )
        drained_seconds = time.monotonic() - started - traffic_seconds
    finally:
        stack.stop()

    by_order = timelines(engine)
    out_of_order = sorted(order for order, events in by_order.items() if events != TIMELINE)
    duplicates = sum(max(0, len(events) - len(TIMELINE)) for events in by_order.values())
    chaos_report.record(
        ordered=ordered,
        orders_delivered=len(by_order),
        notices=sum(len(events) for events in by_order.values()),
        faults=dict(faults),
        task_latency_ms=LATENCY_MS,
        traffic_seconds=round(traffic_seconds, 1),
        drain_seconds_after_traffic=round(drained_seconds, 1),
        out_of_order=len(out_of_order),
        duplicate_notices=duplicates,
        example=by_order[out_of_order[0]] if out_of_order else TIMELINE,
    )
    assert ORDERS == len(by_order), "every order was delivered"
    assert 0 == duplicates
    if ordered:
        assert [] == out_of_order
    else:
        assert out_of_order, "without ordering the notices overtake one another"
