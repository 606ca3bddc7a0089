"""outbox.testing: capture what code enqueued, and run it eagerly, without a broker."""

from __future__ import annotations

from celery import Celery
from flask import Flask
from sqlalchemy.orm import Session

from outbox import TaskOutbox
from outbox.testing import capture_tasks
from webapp.extensions import outbox

NEW_ORDER = {"customer_email": "ada@example.com", "items": [{"sku": "BOOK-1", "qty": 2}]}


def test_capture_records_calls_in_order_with_their_options(
    tasks: TaskOutbox, session: Session, celery_app: Celery
) -> None:
    """Each enqueue inside the block is recorded with its id, arguments and options."""
    with capture_tasks(tasks) as captured:
        first = tasks.delay("unit.add", 1, 2)
        second = tasks.apply_async("unit.echo", args=("x",), kwargs={"k": 1}, queue="mail")
    tasks.delay("unit.add", 3, 4)  # after the block: not captured
    assert ["unit.add", "unit.echo"] == captured.task_names
    assert [first.id, second.id] == [task.task_id for task in captured]
    [echo] = captured.named("unit.echo")
    assert (["x"], {"k": 1}, {"queue": "mail"}) == (echo.args, echo.kwargs, echo.options)
    assert [] == tasks.observers, "the capture detaches itself"


def test_captured_tasks_run_eagerly_under_their_ids(
    tasks: TaskOutbox, session: Session, celery_app: Celery
) -> None:
    """run() executes each captured task in-process, as a worker would, and returns results."""
    with capture_tasks(tasks) as captured:
        result = tasks.delay("unit.add", 2, 3)
    [eager] = captured.run()
    assert (result.id, 5) == (eager.id, eager.get())


def test_confirming_an_order_enqueues_the_three_fulfilment_tasks(app_context: Flask) -> None:
    """The example's confirm endpoint, asserted the way a user would in their own tests."""
    client = app_context.test_client()
    order_id = client.post("/orders", json=NEW_ORDER).json["id"]
    with capture_tasks(outbox.tasks) as captured:
        response = client.post(f"/orders/{order_id}/confirm")
    assert [
        "orders.notify_customer",
        "orders.reserve_stock",
        "orders.prepare_shipment",
    ] == captured.task_names
    assert [[order_id, "confirmed"], [order_id], [order_id]] == [task.args for task in captured]
    assert [f"order:{order_id}", None, None] == [task.ordering_key for task in captured]
    assert sorted(response.json["tasks"].values()) == sorted(t.task_id for t in captured)

    captured.run()
    effects = client.get(f"/orders/{order_id}").json["effects"]
    assert {"notification": 1, "reservation": 1, "shipment": 1} == effects
    captured.run()
    assert effects == client.get(f"/orders/{order_id}").json["effects"], "idempotent on repeat"


def test_a_rejected_confirm_enqueues_nothing(app_context: Flask) -> None:
    """A 409 leaves nothing captured."""
    client = app_context.test_client()
    order_id = client.post("/orders", json=NEW_ORDER).json["id"]
    client.post(f"/orders/{order_id}/confirm")
    with capture_tasks(outbox.tasks) as captured:
        assert 409 == client.post(f"/orders/{order_id}/confirm").status_code
    assert [] == captured
