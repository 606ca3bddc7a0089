"""The outbox's promises on real PostgreSQL, Redis and a real Celery worker."""

from __future__ import annotations

import json
import threading
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis
from celery import Celery
from sqlalchemy import Engine, func, select, text
from sqlalchemy.orm import Session

from outbox import (
    ArgumentNotSerializableError,
    OutboxMessage,
    OutboxSettings,
    OutboxStatus,
    Relay,
    TaskNotRegisteredError,
    TaskOutbox,
    UnsupportedOptionError,
    outbox_table,
)
from outbox.maintenance.retention import purge_outbox
from tasks.orders import notify_customer
from tests.services import wait_for
from webapp.models import Notification, Order


def make_order(engine: Engine) -> int:
    with Session(engine) as session:
        order = Order(customer_email="ada@example.com", items=[{"sku": "BOOK-1", "qty": 1}])
        session.add(order)
        session.commit()
        return order.id


def notifications(engine: Engine, order_id: int) -> list[str]:
    """Task ids of the notification effects applied for ``order_id``."""
    with Session(engine) as session:
        return list(
            session.scalars(select(Notification.task_id).where(Notification.order_id == order_id))
        )


def row_status(engine: Engine, task_id: str) -> OutboxStatus | None:
    with engine.connect() as conn:
        return conn.execute(
            select(outbox_table.c.status).where(outbox_table.c.task_id == uuid.UUID(task_id))
        ).scalar_one_or_none()


def broker_messages(client: redis.Redis, queue: str) -> list[dict[str, Any]]:
    """Every message waiting in a Redis-backed queue, decoded (kombu stores JSON envelopes)."""
    return [json.loads(raw) for raw in client.lrange(queue, 0, -1)]


def test_committed_enqueue_runs_exactly_once_under_the_returned_id(
    engine: Engine, celery_app: Celery, worker: str
) -> None:
    """Commit, relay, worker: one effect, applied by the task id enqueue returned."""
    order_id = make_order(engine)
    tasks = TaskOutbox(celery_app)
    with Session(engine) as session:
        result = tasks.apply_async(notify_customer, args=(order_id,), session=session)
        session.commit()

    relay = Relay(engine, celery_app)
    assert 1 == relay.drain().published
    assert 0 == relay.drain().published, "a dispatched row is never published again"
    wait_for(lambda: result.ready(), timeout=20)
    assert "SUCCESS" == result.state
    assert [result.id] == notifications(engine, order_id)
    assert OutboxStatus.DISPATCHED == row_status(engine, result.id)


def test_rolled_back_enqueue_leaves_no_row_and_no_task(
    engine: Engine, celery_app: Celery, worker: str
) -> None:
    """A rollback removes the row; the relay publishes nothing and no effect appears."""
    order_id = make_order(engine)
    tasks = TaskOutbox(celery_app)
    with Session(engine) as session:
        result = tasks.apply_async(notify_customer, args=(order_id,), session=session)
        session.flush()
        session.rollback()
    with engine.connect() as conn:
        assert 0 == conn.execute(select(func.count()).select_from(outbox_table)).scalar_one()
    relay = Relay(engine, celery_app)
    assert 0 == relay.drain().published
    # A committed canary for the same order: once the worker has run it, a phantom
    # published alongside would have had its chance to run too.
    with Session(engine) as session:
        canary = tasks.apply_async(notify_customer, args=(order_id,), session=session)
        session.commit()
    assert 1 == relay.drain().published
    wait_for(lambda: canary.ready(), timeout=20)
    assert [canary.id] == notifications(engine, order_id)
    assert "PENDING" == result.state, "the result backend never heard of the rolled-back task"


def test_rows_committed_out_of_id_order_are_all_dispatched(
    engine: Engine, celery_app: Celery
) -> None:
    """A transaction that took a lower id but commits later is still dispatched."""
    tasks = TaskOutbox(celery_app)
    relay = Relay(engine, celery_app, OutboxSettings(batch_size=10))
    with engine.connect() as early, engine.connect() as late:
        slow = tasks.apply_async("orders.notify_customer", args=(1,), queue="nobody", session=early)
        fast = tasks.apply_async("orders.notify_customer", args=(2,), queue="nobody", session=late)
        late.commit()
        assert 1 == relay.run_once().published
        early.commit()
    assert 1 == relay.run_once().published
    assert OutboxStatus.DISPATCHED == row_status(engine, slow.id)
    assert OutboxStatus.DISPATCHED == row_status(engine, fast.id)
    with engine.connect() as conn:
        ids = dict(conn.execute(select(outbox_table.c.task_id, outbox_table.c.id)).all())
    assert ids[uuid.UUID(slow.id)] < ids[uuid.UUID(fast.id)], "the slow row had the lower id"


def test_two_relays_draining_2000_rows_publish_each_once(
    engine: Engine, celery_app: Celery, redis_client: redis.Redis
) -> None:
    """Concurrent relays (SKIP LOCKED) put every row on the broker exactly once."""
    queue = f"count-{uuid.uuid4().hex}"
    tasks = TaskOutbox(celery_app)
    with Session(engine) as session:
        expected = {
            tasks.apply_async("orders.notify_customer", args=(i,), queue=queue, session=session).id
            for i in range(2000)
        }
        session.commit()

    settings = OutboxSettings(batch_size=50)
    published: list[int] = []
    start = threading.Barrier(2)

    def run_relay() -> None:
        relay = Relay(engine, celery_app, settings)
        start.wait()
        published.append(relay.drain(max_seconds=120).published)

    threads = [threading.Thread(target=run_relay) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=180)
    try:
        messages = broker_messages(redis_client, queue)
        assert 2000 == sum(published)
        assert all(count > 0 for count in published), f"both relays worked: {published}"
        assert 2000 == len(messages)
        assert expected == {message["headers"]["id"] for message in messages}
        with engine.connect() as conn:
            statuses = dict(
                conn.execute(select(outbox_table.c.status, func.count()).group_by("status")).all()
            )
        assert {OutboxStatus.DISPATCHED: 2000} == statuses
    finally:
        redis_client.delete(queue)


def test_countdown_task_is_published_when_due_not_before(
    engine: Engine, celery_app: Celery, redis_client: redis.Redis
) -> None:
    """A countdown row stays in the outbox until due, then the relay publishes it."""
    queue = f"later-{uuid.uuid4().hex}"
    tasks = TaskOutbox(celery_app)
    relay = Relay(engine, celery_app)
    with Session(engine) as session:
        result = tasks.apply_async(
            "orders.notify_customer", args=(1,), countdown=1.5, queue=queue, session=session
        )
        session.commit()
        due = session.scalars(select(OutboxMessage.available_at)).one()
    try:
        assert 0 == relay.run_once().published
        assert [] == broker_messages(redis_client, queue)
        wait_for(lambda: relay.run_once().published, timeout=10)
        assert datetime.now(UTC) >= due
        [message] = broker_messages(redis_client, queue)
        assert result.id == message["headers"]["id"]
        assert message["headers"]["eta"] is None, "published when due, not as a broker ETA"
    finally:
        redis_client.delete(queue)


def test_eta_task_is_held_until_its_time(engine: Engine, celery_app: Celery) -> None:
    """An eta an hour away is not published now; moving the clock past it publishes it."""
    tasks = TaskOutbox(celery_app)
    eta = datetime.now(UTC) + timedelta(hours=1)
    with Session(engine) as session:
        tasks.apply_async(
            "orders.notify_customer", args=(1,), eta=eta, queue="nobody", session=session
        )
        session.commit()
    assert 0 == Relay(engine, celery_app).run_once().claimed
    later = Relay(engine, celery_app, clock=lambda: eta + timedelta(seconds=1))
    assert 1 == later.run_once().published


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda t, s: t.apply_async("orders.nope", args=(1,), session=s), TaskNotRegisteredError),
        (
            lambda t, s: t.apply_async(notify_customer, args=(object(),), session=s),
            ArgumentNotSerializableError,
        ),
        (
            lambda t, s: t.apply_async(
                notify_customer, args=(1,), link=notify_customer.s(), session=s
            ),
            UnsupportedOptionError,
        ),
    ],
    ids=["unregistered", "unserializable", "unsupported-option"],
)
def test_invalid_enqueue_writes_nothing_to_postgres(
    engine: Engine, celery_app: Celery, call: Any, error: type[Exception]
) -> None:
    """Validation failures raise before anything reaches the database, even after commit."""
    tasks = TaskOutbox(celery_app)
    with Session(engine) as session:
        with pytest.raises(error):
            call(tasks, session)
        session.commit()
    with engine.connect() as conn:
        assert 0 == conn.execute(select(func.count()).select_from(outbox_table)).scalar_one()


@pytest.mark.postgresql
def test_claim_query_uses_the_partial_index(engine: Engine, celery_app: Celery) -> None:
    """The relay's own claim statement is answered from the pending-only partial index."""
    with engine.connect() as conn:
        indexdef = conn.execute(
            text("SELECT indexdef FROM pg_indexes WHERE indexname = 'ix_celery_outbox_pending_due'")
        ).scalar_one()
    assert "(status, available_at, id) WHERE" in indexdef
    assert "'pending'" in indexdef

    relay = Relay(engine, celery_app)
    claim = relay.claim_query().compile(engine, compile_kwargs={"literal_binds": True})
    with engine.begin() as conn:
        # An empty table makes any plan cheap; forbid the sequential scan so the planner
        # shows which index it would walk.
        conn.execute(text("SET LOCAL enable_seqscan = off"))
        plan = "\n".join(row[0] for row in conn.execute(text(f"EXPLAIN {claim}")))
    assert "Index Scan using ix_celery_outbox_pending_due" in plan, plan


@pytest.mark.postgresql
def test_purge_on_postgres_deletes_old_dispatched_rows_in_batches(
    engine: Engine, celery_app: Celery
) -> None:
    """The batched DELETE works on PostgreSQL and keeps young and pending rows."""
    tasks = TaskOutbox(celery_app)
    with Session(engine) as session:
        # A task without an idempotent consumer: its rows await no confirmation.
        for _ in range(25):
            tasks.apply_async("outbox.sweep", queue="nobody", session=session)
        session.commit()
    Relay(engine, celery_app, OutboxSettings(batch_size=20)).run_once()
    batches: list[int] = []
    future = datetime.now(UTC) + timedelta(seconds=1)
    assert 20 == purge_outbox(engine, future, batch_size=7, progress=batches.append)
    assert [7, 7, 6] == batches
    with engine.connect() as conn:
        statuses = dict(
            conn.execute(select(outbox_table.c.status, func.count()).group_by("status")).all()
        )
    assert {OutboxStatus.PENDING: 5} == statuses
