"""Per-key ordering on PostgreSQL with a real worker: commit order, across writers."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from celery import Celery
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import Engine, select, text

from outbox import OutboxStatus, Relay, TaskOutbox, outbox_table
from outbox.relays.loop import RelayLoop
from tests.chaos.checks import create_orders
from tests.ordering_support import Writer
from tests.services import wait_for
from webapp.models import Notification, StockReservation

NEW_ORDER = {"customer_email": "ada@example.com", "items": [{"sku": "BOOK-1", "qty": 2}]}


@pytest.fixture
def loop(engine: Engine, celery_app: Celery, worker: str) -> Iterator[RelayLoop]:
    """A relay that only a notification wakes in time (its poll is longer than the test)."""
    loop = RelayLoop(Relay(engine, celery_app), poll_interval=600)
    thread = threading.Thread(target=loop.run, daemon=True)
    thread.start()
    wait_for(loop.waiting.is_set)
    yield loop
    loop.stop()
    thread.join(timeout=5)


def events(engine: Engine, order_id: int) -> list[str]:
    with engine.connect() as conn:
        return list(
            conn.scalars(
                select(Notification.event)
                .where(Notification.order_id == order_id)
                .order_by(Notification.id)
            )
        )


def waits_on_a_lock(engine: Engine, writer: Writer) -> bool:
    backend_pid = writer.conn.connection.dbapi_connection.info.backend_pid  # type: ignore[union-attr]
    with engine.connect() as conn:
        return bool(
            conn.execute(
                text("SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = :pid"),
                {"pid": backend_pid},
            ).scalar_one()
        )


def second_writer_waits_then(engine: Engine, celery_app: Celery, first_ends: str) -> int:
    """A enqueues the order's "confirmed" notice and keeps its transaction open; B
    enqueues "shipped" and waits on the key's lock; A ends (``commit`` or ``rollback``),
    B's enqueue goes through, B commits. Returns the order's id."""
    [order_id] = create_orders(engine, 1)
    first, second = Writer(engine, celery_app), Writer(engine, celery_app)
    try:
        first.enqueue(order_id, "confirmed")
        first.result()
        second.enqueue(order_id, "shipped")
        wait_for(lambda: waits_on_a_lock(engine, second))
        first.submit(getattr(first.conn, first_ends))
        first.result()
        second.result()  # its enqueue went through once the first transaction ended
        second.submit(second.conn.commit)
        second.result()
    finally:
        first.close()
        second.close()
    return order_id


@pytest.mark.postgresql
def test_writers_to_one_key_wait_for_each_other_and_run_in_commit_order(
    engine: Engine, celery_app: Celery, loop: RelayLoop
) -> None:
    """B enqueues for the order while A's enqueue is uncommitted: B waits at its enqueue
    until A commits, and the worker applies A's notice before B's."""
    order_id = second_writer_waits_then(engine, celery_app, "commit")
    wait_for(lambda: events(engine, order_id) == ["confirmed", "shipped"])


@pytest.mark.postgresql
def test_a_rolled_back_writer_lets_the_waiting_one_take_its_place(
    engine: Engine, celery_app: Celery, loop: RelayLoop
) -> None:
    order_id = second_writer_waits_then(engine, celery_app, "rollback")
    wait_for(lambda: events(engine, order_id) == ["shipped"])
    with engine.connect() as conn:
        assert [1] == list(
            conn.scalars(
                select(outbox_table.c.ordering_seq).where(
                    outbox_table.c.ordering_key == f"order:{order_id}"
                )
            )
        ), "the rolled-back number was given to the next writer"


def test_writers_to_different_keys_never_wait(engine: Engine, celery_app: Celery) -> None:
    one, other = create_orders(engine, 2)
    first, second = Writer(engine, celery_app), Writer(engine, celery_app)
    try:
        first.enqueue(one, "confirmed")
        first.result()
        second.enqueue(other, "confirmed")
        second.result()  # returns while the first transaction is still open
        for writer in (first, second):
            writer.submit(writer.conn.rollback)
            writer.result()
    finally:
        first.close()
        second.close()


def test_an_order_is_confirmed_shipped_and_delivered_in_that_order(
    app: Flask, engine: Engine, loop: RelayLoop
) -> None:
    """Back to back through the API; each notice waits for the one before it, and each
    hand-over wakes the relay (its poll is longer than the test)."""
    client: FlaskClient = app.test_client()
    order_id = client.post("/orders", json=NEW_ORDER).json["id"]
    for step in ("confirm", "ship", "deliver"):
        assert 200 == client.post(f"/orders/{order_id}/{step}").status_code
    expected = ["confirmed", "shipped", "delivered"]
    wait_for(lambda: client.get(f"/orders/{order_id}").json["timeline"] == expected)
    order = client.get(f"/orders/{order_id}").json
    assert "delivered" == order["status"]
    assert {"notification": 1, "reservation": 1, "shipment": 1} == order["effects"]
    assert 409 == client.post(f"/orders/{order_id}/ship").status_code


def test_a_retried_task_holds_its_key_until_its_retry_has_run(
    engine: Engine, celery_app: Celery, loop: RelayLoop
) -> None:
    [order_id] = create_orders(engine, 1)
    tasks = TaskOutbox(celery_app)
    key = f"order:{order_id}"
    with engine.begin() as conn:
        tasks.apply_async("tests.retry_once_later", (order_id, 0.5), session=conn, ordering_key=key)
        tasks.apply_async(
            "orders.notify_customer", (order_id, "shipped"), session=conn, ordering_key=key
        )
    wait_for(lambda: events(engine, order_id) == ["shipped"])
    with engine.connect() as conn:
        reserved = conn.scalar(
            select(StockReservation.created_at).where(StockReservation.order_id == order_id)
        )
        notified = conn.scalar(
            select(Notification.created_at).where(Notification.order_id == order_id)
        )
    assert reserved is not None
    assert notified is not None
    assert reserved < notified, "the notice ran after the retried reservation"
    runs = select(outbox_table.c.task_runs).where(
        outbox_table.c.ordering_key == key, outbox_table.c.ordering_seq == 1
    )

    def reservation_runs() -> int | None:
        with engine.connect() as conn:
            return conn.scalar(runs)

    wait_for(lambda: reservation_runs() == 2)  # the worker writes its records in batches


def test_a_task_without_an_idempotent_consumer_hands_its_key_on_through_lifecycle(
    engine: Engine, celery_app: Celery, loop: RelayLoop
) -> None:
    [order_id] = create_orders(engine, 1)
    tasks = TaskOutbox(celery_app)
    for event in ("confirmed", "shipped", "delivered"):
        with engine.begin() as conn:
            tasks.apply_async(
                "tests.notify_plainly",
                (order_id, event),
                session=conn,
                ordering_key=f"order:{order_id}",
            )
    wait_for(lambda: events(engine, order_id) == ["confirmed", "shipped", "delivered"])
    with engine.connect() as conn:
        states = list(
            conn.scalars(
                select(outbox_table.c.status).where(
                    outbox_table.c.ordering_key == f"order:{order_id}"
                )
            )
        )
    assert [OutboxStatus.DISPATCHED] * 3 == states
