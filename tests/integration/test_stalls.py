"""One row cannot stall the others, on Redis with queues that must be declared.

With ``task_create_missing_queues = False``, publishing to an undeclared queue raises
``QueueNotFound``, a ``KeyError``, which kombu's Redis transport lists among its
connection errors. The broker answers all the while, so the error is the row's.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
import redis
from celery import Celery
from kombu import Queue
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from outbox import (
    OutboxSettings,
    OutboxStatus,
    QueueNotDeclaredError,
    Relay,
    TaskOutbox,
    outbox_table,
)
from tests.services import insert_pending_row

QUEUE = "declared-only"


@pytest.fixture
def strict_app(redis_client: redis.Redis) -> Iterator[Celery]:
    """A Celery app on this run's Redis that declares one queue and creates no other."""
    app = Celery("strict", broker=os.environ["CELERY_BROKER_URL"], set_as_current=False)
    app.conf.update(
        task_queues=[Queue(QUEUE)],
        task_default_queue=QUEUE,
        task_create_missing_queues=False,
        task_serializer="json",
        accept_content=["json"],
    )

    @app.task(name="strict.add", shared=False)
    def add(x: int, y: int) -> int:
        return x + y

    yield app
    redis_client.delete(QUEUE)


def test_a_row_for_an_undeclared_queue_is_charged_and_the_rest_flow(
    engine: Engine, strict_app: Celery, redis_client: redis.Redis
) -> None:
    """The bad row gets an attempt and backs off; the healthy rows behind it are published;
    after max_attempts it is dead, and the outbox never stopped."""
    # A row written before a deploy removed its queue from task_queues.
    bad = insert_pending_row(engine, "strict.add", [1, 2], {"queue": "removed-queue"})
    tasks = TaskOutbox(strict_app)
    with Session(engine) as session:
        healthy = [tasks.apply_async("strict.add", args=(i, i), session=session) for i in range(5)]
        session.commit()
    settings = OutboxSettings(max_attempts=2, retry_backoff=0.01, retry_backoff_max=0.01)
    relay = Relay(engine, strict_app, settings)

    first = relay.run_once()
    assert (6, 5, 1, False) == (
        first.claimed,
        first.published,
        first.failed,
        first.broker_unavailable,
    )
    assert 5 == redis_client.llen(QUEUE)
    assert {r.id for r in healthy} == {
        str(task_id) for task_id in statuses(engine, OutboxStatus.DISPATCHED)
    }
    t = outbox_table.c
    with engine.connect() as conn:
        attempts, error = conn.execute(
            select(t.attempts, t.last_error).where(t.task_id == bad)
        ).one()
    assert 1 == attempts
    assert "QueueNotFound" in error

    wait_until_due = relay.drain()
    while not wait_until_due.dead:
        wait_until_due = relay.drain()
    assert [bad] == statuses(engine, OutboxStatus.DEAD)


def statuses(engine: Engine, status: OutboxStatus) -> list[uuid.UUID]:
    with engine.connect() as conn:
        query = select(outbox_table.c.task_id).where(outbox_table.c.status == status)
        return list(conn.execute(query).scalars())


def test_enqueue_refuses_a_queue_the_app_neither_declares_nor_creates(
    engine: Engine, strict_app: Celery
) -> None:
    """The error comes at enqueue, in the request, naming the queue and the fix."""
    tasks = TaskOutbox(strict_app)
    with Session(engine) as session:
        with pytest.raises(QueueNotDeclaredError, match=r"'removed-queue'.*declare the queue"):
            tasks.apply_async("strict.add", args=(1, 2), queue="removed-queue", session=session)
        assert not session.new, "nothing was added to the session"
        tasks.apply_async("strict.add", args=(1, 2), queue=QUEUE, session=session)
        session.rollback()
