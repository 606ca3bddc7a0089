"""The orders service end to end: HTTP, PostgreSQL, the beat sweep task, Redis, a worker."""

from __future__ import annotations

import json
import threading
import uuid
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import Engine, func, select

from outbox import outbox_table
from tasks.sweep import sweep
from tests.services import wait_for
from webapp.extensions import db, outbox

NEW_ORDER = {"customer_email": "ada@example.com", "items": [{"sku": "BOOK-1", "qty": 2}]}
ONE_EACH = {"notification": 1, "reservation": 1, "shipment": 1}


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def effects(client: FlaskClient, order_id: int) -> dict[str, int]:
    body: dict[str, Any] = client.get(f"/orders/{order_id}").json or {}
    effects: dict[str, int] = body["effects"]
    return effects


def test_confirm_runs_each_task_once_through_the_sweep(
    client: FlaskClient, app: Flask, worker: str
) -> None:
    """create → confirm → the sweep publishes → each of the three effects appears once."""
    created = client.post("/orders", json=NEW_ORDER)
    assert 201 == created.status_code
    order_id = created.json["id"]

    confirmed = client.post(f"/orders/{order_id}/confirm")
    assert 200 == confirmed.status_code
    assert {"notification", "reservation", "shipment"} == set(confirmed.json["tasks"])

    sweep.delay()
    wait_for(lambda: effects(client, order_id) == ONE_EACH, timeout=20)

    again = client.post(f"/orders/{order_id}/confirm")
    assert 409 == again.status_code
    assert "conflict" == again.json["error"]
    status = app.test_cli_runner().invoke(args=["outbox", "status", "--json"])
    counts = json.loads(status.output)
    assert (0, 0, 3) == (counts["pending"], counts["dead"], counts["dispatched_last_minute"])
    with app.app_context():
        assert 0 == outbox.relay.drain().published, "the 409 enqueued nothing"
    assert ONE_EACH == effects(client, order_id)


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "error"),
    [
        ("post", "/orders", "{oops", 400, "invalid_request"),
        ("post", "/orders", '{"items": []}', 400, "invalid_request"),
        ("get", "/orders/987654321", None, 404, "not_found"),
        ("post", "/orders/987654321/confirm", None, 404, "not_found"),
        ("get", f"/orders/{2**31}", None, 404, "not_found"),
        ("post", f"/orders/{2**31}/confirm", None, 404, "not_found"),
        ("post", f"/orders/{2**64}/confirm", None, 404, "not_found"),
        (
            "post",
            "/orders",
            '{"customer_email": "a\\u0000@b.c", "items": [{"sku": "X", "qty": 1}]}',
            400,
            "invalid_request",
        ),
    ],
)
def test_bad_requests_get_json_errors(
    client: FlaskClient, method: str, path: str, body: str | None, status: int, error: str
) -> None:
    """Bad input on PostgreSQL is a 400/404 JSON body, never a 500."""
    response = getattr(client, method)(path, data=body, content_type="application/json")
    assert status == response.status_code
    assert error == response.json["error"]


def test_concurrent_confirms_enqueue_one_set_of_tasks(app: Flask, engine: Engine) -> None:
    """Eight simultaneous confirms of one order: one 200, seven 409, three outbox rows."""
    order_id = app.test_client().post("/orders", json=NEW_ORDER).json["id"]
    start = threading.Barrier(8)
    codes: list[int] = []

    def confirm() -> None:
        client = app.test_client()
        start.wait()
        codes.append(client.post(f"/orders/{order_id}/confirm").status_code)

    threads = [threading.Thread(target=confirm) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert [200] + [409] * 7 == sorted(codes)
    with engine.connect() as conn:
        rows = conn.execute(select(func.count()).select_from(outbox_table)).scalar_one()
    assert 3 == rows


def test_concurrent_orders_with_one_idempotency_key_make_one_order(
    app: Flask, engine: Engine
) -> None:
    """Eight simultaneous POSTs with the same key and body: the unique key decides, one
    201 and seven 200, all with the winner's order, and one row in the table."""
    key = f"concurrent-{uuid.uuid4()}"
    start = threading.Barrier(8)
    answers: list[tuple[int, int]] = []

    def create() -> None:
        client = app.test_client()
        start.wait()
        response = client.post("/orders", json=NEW_ORDER, headers={"Idempotency-Key": key})
        answers.append((response.status_code, (response.json or {}).get("id")))

    threads = [threading.Thread(target=create) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert [200] * 7 + [201] == sorted(code for code, _ in answers)
    assert 1 == len({order_id for _, order_id in answers})
    orders = db.metadata.tables["orders"]
    with engine.connect() as conn:
        made = conn.execute(
            select(func.count()).select_from(orders).where(orders.c.idempotency_key == key)
        ).scalar_one()
    assert 1 == made


def test_idempotency_keys_are_compared_exactly(app: Flask) -> None:
    """Keys that differ only in case are different keys, on every database (MariaDB
    compares text case-insensitively unless the column says otherwise)."""
    client = app.test_client()
    key = f"Key-{uuid.uuid4()}"
    codes = [
        client.post("/orders", json=NEW_ORDER, headers={"Idempotency-Key": k}).status_code
        for k in (key, key.lower(), key.upper())
    ]
    assert [201, 201, 201] == codes
