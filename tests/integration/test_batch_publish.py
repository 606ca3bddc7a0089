"""Batched (pipelined) publishing on real Redis: one flush a batch, all-or-nothing marking."""

from __future__ import annotations

import threading
import uuid
from collections import Counter

import pytest
import redis
from celery import Celery
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from outbox import OutboxSettings, OutboxStatus, Relay, TaskOutbox, outbox_table
from tasks.orders import notify_customer
from tests.integration.test_delivery import broker_messages

ROWS = 40


def relay_app(celery_app: Celery, socket_timeout: float) -> Celery:
    """A Celery app configured like the example's, but with its own broker connections."""
    app = Celery("relay-under-test", set_as_current=False)
    app.config_from_object("celeryconfig")
    app.conf.broker_transport_options = {
        **celery_app.conf.broker_transport_options,
        "socket_timeout": socket_timeout,
    }
    app.tasks.register(notify_customer)
    return app


def enqueue(engine: Engine, celery_app: Celery, queue: str, count: int) -> set[str]:
    tasks = TaskOutbox(celery_app)
    with Session(engine) as session:
        ids = {
            tasks.apply_async(notify_customer, args=(i,), queue=queue, session=session).id
            for i in range(count)
        }
        session.commit()
    return ids


def status_counts(engine: Engine, ids: set[str]) -> dict[str, int]:
    t = outbox_table.c
    with engine.connect() as conn:
        rows = conn.execute(
            select(t.status, func.count())
            .where(t.task_id.in_([uuid.UUID(i) for i in ids]))
            .group_by(t.status)
        ).all()
    return {str(status.value): count for status, count in rows}


def test_the_example_broker_settings_keep_publishing_pipelined(celery_app: Celery) -> None:
    """kombu only pipelines when a timed-out write cannot be replayed (no retry_on_timeout):
    the example's Redis options must keep that true, or every message costs a round trip."""
    with celery_app.producer_or_acquire() as producer:
        assert producer.supports_batch_publish


def test_a_batch_whose_flush_fails_stays_pending_and_goes_out_again_under_the_same_ids(
    engine: Engine,
    celery_app: Celery,
    redis_client: redis.Redis,
    empty_tables: None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Redis stops accepting writes while the batch is buffered: the flush times out,
    nothing is marked, and the next run publishes every row under its own id."""
    queue = f"batch-{uuid.uuid4().hex}"
    relay = Relay(engine, relay_app(celery_app, 0.3), OutboxSettings(batch_size=ROWS))
    # A first row connects the relay and declares the queue, both of which write to Redis.
    warm_up = enqueue(engine, celery_app, queue, 1)
    assert 1 == relay.run_once().published
    ids = enqueue(engine, celery_app, queue, ROWS)

    # Writes (LPUSH) wait for the pause to end; reads (kombu's routing lookup) do not, so
    # the batch is buffered normally and only its flush times out.
    redis_client.execute_command("CLIENT", "PAUSE", 1500, "WRITE")
    result = relay.run_once()
    assert result.broker_unavailable
    assert "BatchPublishError" in caplog.text, "the failure was the pipeline's flush"
    assert (result.claimed, result.published, result.failed) == (ROWS, 0, 0)
    assert {"pending": ROWS} == status_counts(engine, ids), "nothing counts as published"
    with engine.connect() as conn:
        attempts = conn.execute(
            select(func.max(outbox_table.c.attempts)).where(
                outbox_table.c.task_id.in_([uuid.UUID(i) for i in ids])
            )
        ).scalar_one()
    assert 0 == attempts, "a broker failure is not the rows' fault"

    redis_client.execute_command("CLIENT", "UNPAUSE")
    again = relay.run_once()
    assert (again.published, again.broker_unavailable) == (ROWS, False)
    assert {OutboxStatus.DISPATCHED.value: ROWS} == status_counts(engine, ids)

    # The timed-out pipeline may still have been applied once Redis resumed: some rows
    # can be on the queue twice, always under the id fixed at enqueue, never a new one.
    delivered = Counter(m["headers"]["id"] for m in broker_messages(redis_client, queue))
    assert ids | warm_up == set(delivered)
    assert all(1 <= n <= 2 for n in delivered.values())
    redis_client.delete(queue)


def test_concurrent_batches_through_one_app_do_not_mix(
    engine: Engine, celery_app: Celery, redis_client: redis.Redis, empty_tables: None
) -> None:
    """Two threads draining with one Celery app (the beat sweep beside a relay in one
    process): each batch has its own producer and pipeline, so each row goes out once."""
    queue = f"batch-{uuid.uuid4().hex}"
    ids = enqueue(engine, celery_app, queue, 1000)
    relays = [Relay(engine, celery_app, OutboxSettings(batch_size=50)) for _ in range(2)]
    threads = [threading.Thread(target=r.drain, kwargs={"max_seconds": 60}) for r in relays]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=90)
    assert {OutboxStatus.DISPATCHED.value: 1000} == status_counts(engine, ids)
    delivered = Counter(m["headers"]["id"] for m in broker_messages(redis_client, queue))
    assert ids == set(delivered)
    assert {1} == set(delivered.values())
    redis_client.delete(queue)
