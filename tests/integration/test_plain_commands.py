"""The commands a Celery user types work as typed: `celery -A tasks worker` runs the sweep."""

from __future__ import annotations

import re
import uuid
from pathlib import Path

from celery import Celery
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from outbox import OutboxStatus, TaskOutbox
from outbox.contrib.celery import SWEEP_TASK_NAME
from tests.chaos.processes import Process
from tests.integration.test_delivery import make_order, notifications, row_status
from tests.services import wait_for, worker_command


def test_a_plain_worker_consumes_the_sweep_queue_and_beat_s_sweep_publishes(
    engine: Engine, celery_app: Celery, worker: str
) -> None:
    """The session worker runs `celery -A tasks worker` without -Q: it consumes both
    declared queues, and a sweep sent as beat sends it publishes a committed task."""
    [queues] = celery_app.control.inspect([worker], timeout=5).active_queues().values()
    assert {"celery", "outbox"} <= {queue["name"] for queue in queues}
    order_id = make_order(engine)
    with Session(engine) as session:
        result = TaskOutbox(celery_app).apply_async(
            "orders.notify_customer", args=(order_id,), session=session
        )
        session.commit()
    [entry] = [e for e in celery_app.conf.beat_schedule.values() if e["task"] == SWEEP_TASK_NAME]
    celery_app.send_task(entry["task"], **entry["options"])
    wait_for(lambda: row_status(engine, result.id) == OutboxStatus.DISPATCHED)
    assert [result.id] == wait_for(lambda: notifications(engine, order_id))


def test_a_worker_that_does_not_consume_the_sweep_queue_says_so(
    celery_app: Celery, tmp_path: Path
) -> None:
    """`-Q` without the sweep's queue: the worker's log warns that nothing is published."""
    name = f"no-sweep-{uuid.uuid4().hex[:8]}"
    queue = f"{name}-queue"
    process = Process(name, worker_command(f"{name}@localhost", queue), {}, tmp_path)
    try:
        wait_for(lambda: not process.alive or re.search(r"\bready\.", process.log()), timeout=60)
        assert process.alive, process.log()
    finally:
        process.stop()
    log = process.log()
    assert "this worker does not consume the 'outbox' queue, where the outbox sweep runs" in log
    assert f"This worker consumes: {queue}" in log
