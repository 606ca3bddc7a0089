"""On Redis, a task whose message is neither queued nor held by a worker is lost, and is
published again; one still queued, or held unacknowledged, is left alone.

kombu's Redis transport takes a message in two steps (pop it off the list, then record
it in ``unacked``), so a worker killed in between takes it along (kombu #305). Here the
test takes a message off the list itself, which is what such a worker leaves behind.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
import redis
from celery import Celery
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from outbox import OutboxStatus, Relay, TaskOutbox, outbox_table
from outbox.maintenance.confirmation import ABSENT_TWICE_GAP, LOST_AFTER
from tasks.orders import reserve_stock
from tests.integration.test_delivery import broker_messages, make_order


class Clock:
    """Real time, moved forward by hand."""

    def __init__(self) -> None:
        self.offset = timedelta()

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += timedelta(seconds=seconds)


@pytest.fixture
def queue(redis_client: redis.Redis) -> Iterator[str]:
    name = f"lost-{uuid.uuid4().hex[:8]}"
    yield name
    redis_client.delete(name)


def statuses(engine: Engine) -> dict[str, tuple[str, int]]:
    t = outbox_table.c
    with engine.connect() as conn:
        query = select(t.task_id, t.status, t.deliveries).order_by(t.id)
        return {str(task_id): (status, n) for task_id, status, n in conn.execute(query)}


def test_only_the_task_the_broker_no_longer_holds_is_published_again(
    engine: Engine, celery_app: Celery, redis_client: redis.Redis, queue: str
) -> None:
    """Three tasks on a queue no worker consumes: one taken by a consumer that has not
    acknowledged it, one taken off the list and lost, one still waiting. Only the lost
    one is published again, and only at the second check that misses it."""
    order_id = make_order(engine)
    outbox = TaskOutbox(celery_app)
    with Session(engine) as session:
        held, lost, waiting = (
            outbox.apply_async(reserve_stock, args=(order_id,), queue=queue, session=session).id
            for _ in range(3)
        )
        session.commit()
    clock = Clock()
    relay = Relay(engine, celery_app, clock=clock)
    assert 3 == relay.drain(maintain=False).published
    with celery_app.connection_for_write() as conn:
        consumer = conn.SimpleQueue(queue)
        try:
            message = consumer.get(timeout=5)  # the oldest: now in kombu's unacked hash
            assert held == message.headers["id"]
            assert 1 == redis_client.hlen("unacked")
            redis_client.rpop(queue)  # the next: popped by a worker that died at once
            assert 1 == redis_client.llen(queue)

            clock.advance(LOST_AFTER)
            first = relay.confirmation.run_once()
            clock.advance(ABSENT_TWICE_GAP.total_seconds())
            second = relay.confirmation.run_once()
        finally:
            consumer.close()
    assert (0, 1) == (first.republished, second.republished)
    assert {
        held: (OutboxStatus.DISPATCHED, 1),
        lost: (OutboxStatus.PENDING, 1),
        waiting: (OutboxStatus.DISPATCHED, 1),
    } == statuses(engine)
    assert 1 == relay.drain(maintain=False).published
    assert lost in {m["headers"]["id"] for m in broker_messages(redis_client, queue)}


def test_behind_a_backlog_too_long_to_read_the_broker_cannot_tell(
    engine: Engine,
    celery_app: Celery,
    redis_client: redis.Redis,
    queue: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """More messages than MAX_MESSAGES_READ: nothing is read, so nothing is taken for lost
    (the task waits for its confirmation timeout instead)."""
    from outbox.transports import redis as redis_probe

    order_id = make_order(engine)
    with Session(engine) as session:
        for _ in range(3):
            TaskOutbox(celery_app).apply_async(
                reserve_stock, args=(order_id,), queue=queue, session=session
            )
        session.commit()
    clock = Clock()
    relay = Relay(engine, celery_app, clock=clock)
    assert 3 == relay.drain(maintain=False).published
    monkeypatch.setattr(redis_probe, "MAX_MESSAGES_READ", 2)
    assert relay.probe.held_task_ids({queue}) is None
    redis_client.delete(queue)  # lost, all three: but behind a "backlog" it cannot see
    monkeypatch.setattr(redis_probe, "MAX_MESSAGES_READ", -1)  # any count is too many
    for _ in range(2):
        clock.advance(LOST_AFTER + ABSENT_TWICE_GAP.total_seconds())
        assert 0 == relay.confirmation.run_once().republished
