"""A relay killed between publishing and marking: republished, same ids, applied once."""

from __future__ import annotations

import sys
from pathlib import Path

import redis
from celery import Celery
from sqlalchemy import Engine

from tasks.orders import reserve_stock
from tests.chaos.checks import (
    effects_per_order,
    enqueue_orders,
    outbox_counts,
    queue_drained,
    skipped_duplicates,
    tally,
)
from tests.chaos.crashing_relay import EXIT_CODE
from tests.chaos.processes import Process, start_relay
from tests.services import ChaosReport, wait_for

ORDERS = 100
BATCH_SIZE = 50
#: The relay dies once this many messages reached the broker. A batch is sent in one
#: pipeline, so by then its whole first batch is out, and none of it is marked.
CRASH_AFTER = 30


def test_relay_killed_after_publishing_before_marking(
    engine: Engine,
    celery_app: Celery,
    worker: str,
    redis_client: redis.Redis,
    tmp_path: Path,
    chaos_report: ChaosReport,
    worker_log: Path,
) -> None:
    """The crashed batch stays pending; a new relay republishes it; each effect lands once."""
    orders = enqueue_orders(engine, celery_app, reserve_stock, ORDERS)
    committed = len(orders.committed)
    skipped_before = skipped_duplicates(worker_log)

    crashing = Process(
        "relay-crashing",
        [sys.executable, "-m", "tests.chaos.crashing_relay", str(CRASH_AFTER)],
        {"OUTBOX_BATCH_SIZE": str(BATCH_SIZE)},
        tmp_path,
    )
    crashing.popen.wait(timeout=60)
    assert EXIT_CODE == crashing.popen.returncode, crashing.log()
    assert {"pending": committed} == outbox_counts(engine), "the crashed batch was never marked"

    relay = start_relay("relay", tmp_path, OUTBOX_BATCH_SIZE=str(BATCH_SIZE))
    try:
        wait_for(lambda: outbox_counts(engine) == {"dispatched": committed}, timeout=30)
    finally:
        relay.stop()
    wait_for(lambda: queue_drained(redis_client, "celery"), timeout=60)

    assert dict.fromkeys(orders.committed, 1) == effects_per_order(engine)
    # Each message the crashed relay got out (its first batch) was delivered twice; the
    # repeat was skipped.
    skipped = wait_for(
        lambda: (n := skipped_duplicates(worker_log) - skipped_before) >= BATCH_SIZE and n,
        timeout=20,
    )
    assert BATCH_SIZE == skipped
    chaos_report.record(
        messages=ORDERS,
        faults=f"relay exited after publishing a batch of {BATCH_SIZE}, before marking",
        committed=committed,
        rolled_back=len(orders.rolled_back),
        redelivered=skipped,
        **tally(engine, orders),
    )
