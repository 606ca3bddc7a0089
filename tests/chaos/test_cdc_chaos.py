"""The CDC relay under fire: SIGKILLed at random and restarted, its standby taking over,
Redis restarted without its data.

The example's stack (gunicorn, two plain workers, beat) runs on a database of a
PostgreSQL cluster of the run's own with ``wal_level = logical``, with two
``flask --app webapp outbox relay --cdc`` processes: one streams from the slot, the
other stands by. Clients create orders over HTTP; most are confirmed (three tasks: the
reservation and the shipment are streamed, the notice is ordered by its order and goes
through the relays' polling side), some are then shipped and delivered (two more
ordered notices), some confirmations run and roll back, some orders are never
confirmed. Meanwhile the relay that streams is SIGKILLed (and restarted, as a new
standby) and Redis is restarted.

Counted from the database: lost, duplicate and phantom effects, notices out of order,
and how long each take-over took (from the kill until the other relay streams).
"""

from __future__ import annotations

import json
import random
import re
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from flask import Flask
from sqlalchemy import Engine, select, text
from sqlalchemy.orm import Session

from tests.chaos.processes import FAST_REDELIVERY
from tests.chaos.redis_server import RedisServer, free_port, redis_server
from tests.chaos.test_mixed_faults import Clients, Stack, confirm_then_roll_back, ping
from tests.services import ChaosReport, wait_for
from webapp.models import Notification, Order, OrderStatus, Shipment, StockReservation

ORDERS = 2000
CLIENTS = 4
#: Every UNCONFIRMED_EVERY-th order is never confirmed; the one after it is confirmed in
#: a transaction that rolls back; every DELIVER_EVERY-th is shipped and delivered too.
UNCONFIRMED_EVERY = 10
DELIVER_EVERY = 5
RELAYS = ("relay-a", "relay-b")
TIMELINE = ["confirmed", "shipped", "delivered"]
#: From the last fault until every effect is applied.
DRAIN_WITHIN = 120
STREAMER = text(
    "SELECT r.application_name FROM pg_replication_slots s"
    " JOIN pg_stat_replication r ON r.pid = s.active_pid WHERE s.slot_name = 'celery_outbox'"
)
PID = re.compile(r"\b(\d+)$")


class CdcStack(Stack):
    """The example's stack with two CDC relays instead of the polling one."""

    def command(self, name: str) -> list[str]:
        if name.startswith("relay"):
            return [*super().command("relay"), "--cdc"]
        return super().command(name)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[RedisServer]:
    with redis_server(tmp_path, persistent=False) as server:
        yield server


@pytest.fixture
def orders_app(logical_engine: Engine) -> Iterator[Flask]:
    """The example app on the logical cluster's database, for the rolled-back
    confirmations the test runs itself."""
    from webapp import create_app, init_db
    from webapp.extensions import db

    url = logical_engine.url.render_as_string(hide_password=False)
    app = create_app({"SQLALCHEMY_DATABASE_URI": url})
    with app.app_context():
        init_db(db.engine)
    yield app
    with app.app_context():
        db.engine.dispose()


def streaming_pid(engine: Engine) -> int | None:
    """The process that streams from the slot now (its pid is in its connection's
    application name)."""
    with engine.connect() as conn:
        name = conn.execute(STREAMER).scalar_one_or_none()
    found = PID.search(name or "")
    return int(found.group(1)) if found else None


def outcome(engine: Engine) -> dict[str, object]:
    """Lost, duplicate and phantom effects, and delivered orders whose notices are out of
    order, from what the database holds."""
    with Session(engine) as session:
        status = dict(session.execute(select(Order.id, Order.status)).all())
        reservations = Counter(session.scalars(select(StockReservation.order_id)))
        shipments = Counter(session.scalars(select(Shipment.order_id)))
        notices: dict[int, list[str]] = {}
        for order_id, event in session.execute(
            select(Notification.order_id, Notification.event).order_by(Notification.id)
        ):
            notices.setdefault(order_id, []).append(event)
    lost = duplicates = phantom = 0
    out_of_order = []
    for order_id, state in status.items():
        events = notices.get(order_id, [])
        if state == OrderStatus.PENDING:
            phantom += reservations[order_id] + shipments[order_id] + len(events)
            continue
        expected = TIMELINE[: TIMELINE.index(state) + 1]
        for count in (reservations[order_id], shipments[order_id]):
            lost += count == 0
            duplicates += max(0, count - 1)
        seen = Counter(events)
        lost += sum(1 for event in expected if not seen[event])
        duplicates += sum(max(0, n - 1) for n in seen.values())
        if list(dict.fromkeys(events)) != expected:
            out_of_order.append(order_id)
    return {
        "orders": len(status),
        "confirmed": sum(1 for s in status.values() if s != OrderStatus.PENDING),
        "delivered": sum(1 for s in status.values() if s == OrderStatus.DELIVERED),
        "lost": lost,
        "duplicates": duplicates,
        "phantom": phantom,
        "out_of_order": len(out_of_order),
    }


def not_dispatched(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(
                text("SELECT count(*) FROM celery_outbox WHERE status <> 'dispatched'")
            ).scalar_one()
        )


def all_applied(engine: Engine) -> bool:
    return outcome(engine)["lost"] == 0


@pytest.mark.timeout(420)
@pytest.mark.postgresql
def test_cdc_relays_killed_and_redis_restarted_lose_double_and_invent_nothing(
    orders_app: Flask,
    logical_engine: Engine,
    broker: RedisServer,
    tmp_path: Path,
    chaos_report: ChaosReport,
) -> None:
    url = logical_engine.url.render_as_string(hide_password=False)
    env = {
        "DATABASE_URL": url,
        "CELERY_BROKER_URL": broker.url,
        "CELERY_RESULT_BACKEND": broker.url,
        "CELERY_BROKER_TRANSPORT_OPTIONS": json.dumps(FAST_REDELIVERY),
    }
    stack = CdcStack(tmp_path, env, free_port())
    clients = Clients(f"http://127.0.0.1:{stack.port}")
    rng = random.Random(20261206)
    faults: Counter[str] = Counter()
    takeovers: list[float] = []

    def customer(number: int) -> None:
        for i in range(number, ORDERS, CLIENTS):
            order = clients.call("POST", "/orders", {
                "customer_email": f"c{i}@example.com", "items": [{"sku": "BOOK-1", "qty": 1}],
            })  # fmt: skip
            if i % UNCONFIRMED_EVERY == 0:
                continue
            if i % UNCONFIRMED_EVERY == 1:
                confirm_then_roll_back(orders_app, order["id"])
                continue
            clients.call("POST", f"/orders/{order['id']}/confirm")
            if i % DELIVER_EVERY == 2:
                clients.call("POST", f"/orders/{order['id']}/ship")
                clients.call("POST", f"/orders/{order['id']}/deliver")

    def kill_the_streaming_relay() -> None:
        pid = wait_for(lambda: streaming_pid(logical_engine), timeout=60)
        name = next(n for n in RELAYS if stack.processes[n].popen.pid == pid)
        killed = time.monotonic()
        stack.kill(name)
        new = wait_for(
            lambda: (p := streaming_pid(logical_engine)) not in (None, pid) and p,
            timeout=60,
            interval=0.02,
        )
        takeovers.append(time.monotonic() - killed)
        assert new != pid

    def restart_broker() -> None:
        broker.kill()
        broker.start()

    schedule = [("streaming relay SIGKILL", kill_the_streaming_relay)] * 4
    schedule += [("Redis restart without its data", restart_broker)] * 2
    rng.shuffle(schedule)
    try:
        for name in ("web", "worker-a", "worker-b", "beat", *RELAYS):
            stack.start(name)
        wait_for(lambda: stack.supervise() or ping(clients.base), timeout=60)
        wait_for(lambda: streaming_pid(logical_engine), timeout=60)
        customers = [threading.Thread(target=customer, args=(n,)) for n in range(CLIENTS)]
        started, last_fault = stack.traffic_with_faults(
            customers, schedule, faults, gap=lambda: rng.uniform(2.0, 5.0)
        )
        traffic_seconds = time.monotonic() - started
        wait_for(
            lambda: stack.supervise() or all_applied(logical_engine),
            timeout=max(1.0, DRAIN_WITHIN - (time.monotonic() - last_fault)),
            interval=0.5,
        )
        drained_seconds = time.monotonic() - last_fault
        # The rows end dispatched, the stream's in bulk after publishing.
        wait_for(lambda: stack.supervise() or not_dispatched(logical_engine) == 0, timeout=60)
        with logical_engine.connect() as conn:
            lag = conn.execute(
                text(
                    "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)"
                    " FROM pg_replication_slots WHERE slot_name = 'celery_outbox'"
                )
            ).scalar_one()
    finally:
        stack.stop()

    result = outcome(logical_engine)
    worker_logs = stack.logs("worker")
    chaos_report.record(
        **result,
        faults=dict(faults),
        traffic_seconds=round(traffic_seconds, 1),
        drain_seconds_after_last_fault=round(drained_seconds, 1),
        takeover_seconds=[round(s, 2) for s in takeovers],
        slot_lag_bytes_at_the_end=int(lag),
        skipped_duplicates=worker_logs.count("already processed: skipped"),
        processes_restarted_after_exiting=len(stack.crashed),
    )
    assert ORDERS == result["orders"]
    assert (0, 0, 0) == (result["lost"], result["duplicates"], result["phantom"])
    assert 0 == result["out_of_order"]
    assert 4 == len(takeovers)
