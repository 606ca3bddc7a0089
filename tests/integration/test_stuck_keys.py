"""An ordered task whose worker process is killed while it runs is reported, not waited
for in silence: a real ``celery -A tasks worker``, one of its processes SIGKILLed."""

from __future__ import annotations

import os
import signal
import uuid
from datetime import UTC, datetime, timedelta

import pytest
import redis
from celery import Celery
from sqlalchemy import Engine, select

from outbox import KeyNotBlockedError, Relay, TaskOutbox, UnblockAction, outbox_table, unblock
from outbox.maintenance.confirmation import ABSENT_TWICE_GAP, LOST_AFTER
from outbox.maintenance.key_keeper import WORKER_GONE_AFTER
from outbox.ordering.keys import active_keys
from tests.integration.test_delivery import make_order
from tests.integration.test_lost_messages import Clock
from tests.integration.test_ordering import events
from tests.services import wait_for


class ShiftedClock:
    """Real time, ``offset`` seconds ahead: the key keeper looks at heartbeats as they will
    look once ``WORKER_GONE_AFTER`` has passed, without the test waiting for it."""

    def __init__(self, offset: float) -> None:
        self.offset = timedelta(seconds=offset)

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset


def started_by(engine: Engine, task_id: str) -> str | None:
    t = outbox_table.c
    with engine.connect() as conn:
        row = conn.execute(
            select(t.task_state, t.task_worker).where(t.task_id == uuid.UUID(task_id))
        ).one()
    return row.task_worker if row.task_state == "STARTED" else None


def test_a_plain_ordered_task_whose_worker_process_dies_blocks_its_key_as_stuck(
    engine: Engine, celery_app: Celery, worker: str, redis_client: redis.Redis
) -> None:
    """The run names its process; once that process is gone, the key is blocked with the
    reason (so status, /healthz, /metrics and the dashboard count it), and ``unblock
    --retry`` runs the task again, after which the key goes on in order."""
    order_id = make_order(engine)
    key = f"order:{order_id}"
    outbox = TaskOutbox(celery_app).ordered(key)
    with engine.begin() as conn:
        held = outbox.apply_async("tests.hold_key_plainly", (order_id, "paid"), session=conn)
        outbox.apply_async("tests.notify_plainly", (order_id, "shipped"), session=conn)
    relay = Relay(engine, celery_app)
    relay.drain()
    process = wait_for(lambda: started_by(engine, held.id), timeout=30)
    node, _, pid = process.rpartition(":")
    assert node == worker

    relay.key_keeper.run_once()
    assert [] == active_keys_blocked(engine), "a run whose process beats is left alone"

    os.kill(int(pid), signal.SIGKILL)
    later = Relay(engine, celery_app, clock=ShiftedClock(WORKER_GONE_AFTER + 1))
    assert 1 == later.key_keeper.run_once().stuck
    with engine.connect() as conn:
        [blocked] = active_keys(conn, blocked_only=True)
    assert key == blocked.key
    assert f"worker process {process}" in (blocked.blocked_reason or "")
    assert [] == events(engine, order_id), "shipped waits behind the stuck task"

    with engine.begin() as conn:
        unblock(conn, key, UnblockAction.RETRY, datetime.now(UTC))
    redis_client.rpush(f"tests:release:{held.id}", 1)  # in case the retry runs first
    wait_for(lambda: (relay.drain(), len(events(engine, order_id)) == 2)[1], timeout=30)
    assert ["paid", "shipped"] == events(engine, order_id)


def test_unblock_refuses_a_key_whose_task_runs_on_a_live_worker(
    engine: Engine, celery_app: Celery, worker: str, redis_client: redis.Redis
) -> None:
    """Only a stuck key is unblocked: one whose task is running is not."""
    order_id = make_order(engine)
    key = f"order:{order_id}"
    with engine.begin() as conn:
        held = (
            TaskOutbox(celery_app)
            .ordered(key)
            .apply_async("tests.hold_key_plainly", (order_id, "paid"), session=conn)
        )
    relay = Relay(engine, celery_app)
    relay.drain()
    wait_for(lambda: started_by(engine, held.id), timeout=30)
    try:
        with engine.begin() as conn, pytest.raises(KeyNotBlockedError, match="is not blocked"):
            unblock(conn, key, UnblockAction.RETRY, datetime.now(UTC))
    finally:
        redis_client.rpush(f"tests:release:{held.id}", 1)
    wait_for(lambda: events(engine, order_id) == ["paid"], timeout=30)


def active_keys_blocked(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        return [state.key for state in active_keys(conn, blocked_only=True)]


def test_a_plain_ordered_task_whose_message_is_lost_before_it_starts_blocks_its_key(
    engine: Engine, celery_app: Celery, redis_client: redis.Redis
) -> None:
    """On Redis, a plain ordered task whose message is neither queued nor held by a
    worker at two checks, and which never started, stops its key with the reason."""
    queue = f"lost-{uuid.uuid4().hex[:8]}"  # no worker consumes it
    order_id = make_order(engine)
    key = f"order:{order_id}"
    with engine.begin() as conn:
        TaskOutbox(celery_app).ordered(key).apply_async(
            "tests.notify_plainly", (order_id, "paid"), session=conn, queue=queue
        )
    clock = Clock()
    with Relay(engine, celery_app, clock=clock) as relay:
        assert 1 == relay.drain(maintain=False).published
        assert 1 == redis_client.llen(queue)
        redis_client.delete(queue)  # popped by a worker that died at once
        clock.advance(LOST_AFTER)
        relay.confirmation.run_once()
        assert [] == active_keys_blocked(engine), "one check that misses it is not enough"
        clock.advance(ABSENT_TWICE_GAP.total_seconds())
        relay.confirmation.run_once()
    with engine.connect() as conn:
        [blocked] = active_keys(conn, blocked_only=True)
    assert key == blocked.key
    assert "never started" in (blocked.blocked_reason or "")
