"""The relay's PostgreSQL connections terminated again and again while it drains.

``pg_terminate_backend`` cuts whatever the relay's connection was doing: a claim, the
publishing of a batch whose mark then never commits, the commit itself, the LISTEN
connection. The relay must log, back off and carry on; a batch that reached the broker
but was never marked is published again under the same task ids, and the idempotent
consumer applies each effect once.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest
import redis
from celery import Celery
from sqlalchemy import Engine, text

from tasks.orders import reserve_stock
from tests.chaos.checks import (
    effects_per_order,
    enqueue_orders,
    outbox_counts,
    queue_drained,
    skipped_duplicates,
    tally,
)
from tests.chaos.processes import start_relay
from tests.services import ChaosReport, wait_for

ORDERS = 2000
APPLICATION_NAME = "outbox-chaos-relay"
KILL_EVERY_SECONDS = 0.2
#: Rounds that must terminate at least one relay backend while rows are still pending.
KILLS_WITH_WORK_LEFT = 5
TERMINATE = text(
    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = :name"
)
RECEIVED = re.compile(r"Task orders\.reserve_stock\[[0-9a-f-]+\] received")
BACKOFF = re.compile(r"relay drain failed, retrying in ([0-9.]+)s")


@pytest.mark.postgresql
def test_relay_survives_its_database_connections_being_terminated(
    engine: Engine,
    celery_app: Celery,
    worker: str,
    redis_client: redis.Redis,
    tmp_path: Path,
    chaos_report: ChaosReport,
    worker_log: Path,
) -> None:
    """The relay outlives repeated backend terminations mid-batch; each effect lands once."""
    skipped_before = skipped_duplicates(worker_log)
    received_before = len(RECEIVED.findall(worker_log.read_text(errors="replace")))
    orders = enqueue_orders(engine, celery_app, reserve_stock, ORDERS)
    committed = len(orders.committed)
    database_url = f"{os.environ['DATABASE_URL']}?application_name={APPLICATION_NAME}"
    dead_seen = terminated = kills_with_work_left = 0

    def kill_round() -> bool:
        """Terminate the relay's backends once; True when enough kills landed mid-drain."""
        nonlocal dead_seen, terminated, kills_with_work_left
        counts = outbox_counts(engine)
        dead_seen = max(dead_seen, counts.get("dead", 0))
        assert counts.get("pending", 0) > 0, f"the drain ended after {kills_with_work_left} kills"
        with engine.connect() as conn:
            killed = sum(conn.execute(TERMINATE, {"name": APPLICATION_NAME}).scalars())
        terminated += killed
        kills_with_work_left += killed > 0
        return kills_with_work_left >= KILLS_WITH_WORK_LEFT

    relay = start_relay(
        "relay-terminated", tmp_path, DATABASE_URL=database_url, OUTBOX_BATCH_SIZE="20"
    )
    try:
        wait_for(lambda: not relay.alive or outbox_counts(engine).get("dispatched"), timeout=30)
        started_at = time.monotonic()
        wait_for(kill_round, timeout=30, interval=KILL_EVERY_SECONDS)
        last_kill_at = time.monotonic()
        at_last_kill = outbox_counts(engine)

        def drained() -> bool:
            nonlocal dead_seen
            counts = outbox_counts(engine)
            dead_seen = max(dead_seen, counts.get("dead", 0))
            return not relay.alive or {"dispatched": committed} == counts

        wait_for(drained, timeout=40)
        assert relay.alive, relay.log()
        drained_at = time.monotonic()
        wait_for(lambda: len(effects_per_order(engine)) == committed, timeout=60)
        wait_for(lambda: queue_drained(redis_client, "celery"), timeout=30)
        # Still working on its own: a task enqueued now is published without any help.
        [late_order] = enqueue_orders(engine, celery_app, reserve_stock, 1).committed
        wait_for(lambda: late_order in effects_per_order(engine), timeout=30)
        assert relay.alive, relay.log()
    finally:
        relay.stop()
    relay_log = relay.log()

    assert 0 == dead_seen
    assert {"dispatched": committed + 1} == outbox_counts(engine)
    orders.committed.append(late_order)
    assert dict.fromkeys(orders.committed, 1) == effects_per_order(engine)
    backoffs = [float(seconds) for seconds in BACKOFF.findall(relay_log)]
    # Kills of idle pooled connections cost nothing (the pool tests a connection before
    # handing it out); those that land inside a drain fail it, and it is retried.
    assert backoffs, relay_log
    # A drain that committed batches before it failed starts the backoff over: repeated
    # kills must not push the relay into ever longer pauses while it is making progress.
    # Without that reset, five kills in a row double it to 1.6 s and beyond.
    assert max(backoffs) < 1.6, backoffs
    log_text = worker_log.read_text(errors="replace")
    received = len(RECEIVED.findall(log_text)) - received_before
    chaos_report.record(
        messages=ORDERS,
        committed=committed,
        rolled_back=len(orders.rolled_back),
        faults=f"relay backends terminated in {kills_with_work_left} rounds, "
        f"{KILL_EVERY_SECONDS}s apart, with rows pending",
        terminated_backends=terminated,
        pending_at_last_kill=at_last_kill.get("pending", 0),
        drain_failures_logged=len(backoffs),
        longest_backoff_seconds=max(backoffs),
        republished=received - (committed + 1),
        skipped_duplicates=skipped_duplicates(worker_log) - skipped_before,
        **tally(engine, orders),
        dead=dead_seen,
        kill_seconds=round(last_kill_at - started_at, 1),
        drain_seconds_after_last_kill=round(drained_at - last_kill_at, 1),
    )


WAITING_LISTENERS = text("SELECT count(*) FROM celery_outbox_listeners WHERE waiting")
LISTEN_LOST = "LISTEN connection lost"


@pytest.mark.postgresql
def test_a_waiting_relay_outlives_its_connections_being_terminated(
    engine: Engine, celery_app: Celery, worker: str, tmp_path: Path
) -> None:
    """An idle relay, waiting on LISTEN, has its backends terminated (as a database
    restart would): it logs the lost connection, polls, listens again, and publishes
    what is committed after, every time."""
    database_url = f"{os.environ['DATABASE_URL']}?application_name={APPLICATION_NAME}"

    def waiting() -> bool:
        with engine.connect() as conn:
            return bool(conn.execute(WAITING_LISTENERS).scalar_one())

    relay = start_relay("relay-idle-terminated", tmp_path, DATABASE_URL=database_url)
    try:
        published = []
        for round_number in range(1, 4):
            wait_for(lambda: not relay.alive or waiting(), timeout=30)
            assert relay.alive, relay.log()
            with engine.connect() as conn:
                killed = sum(conn.execute(TERMINATE, {"name": APPLICATION_NAME}).scalars())
            assert killed, "the relay had backends to terminate"
            wait_for(
                lambda n=round_number: not relay.alive or relay.log().count(LISTEN_LOST) >= n,
                timeout=30,
            )
            assert relay.alive, relay.log()
            [order] = enqueue_orders(engine, celery_app, reserve_stock, 1).committed
            wait_for(lambda o=order: not relay.alive or o in effects_per_order(engine), timeout=30)
            assert relay.alive, relay.log()
            published.append(order)
    finally:
        relay.stop()
    assert dict.fromkeys(published, 1) == {
        order: count for order, count in effects_per_order(engine).items() if order in published
    }
