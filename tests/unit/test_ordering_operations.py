"""Blocked keys are never silent: status, /metrics, the dashboard and the keys commands."""

from __future__ import annotations

import json

import pytest
from flask import Flask
from sqlalchemy import select

from outbox import OutboxStatus, outbox_table
from outbox.clock import utcnow
from outbox.ordering.handover import Place, finish
from outbox.testing import capture_tasks
from tests.unit.test_dashboard import relay_ran
from webapp.extensions import db, outbox

NEW_ORDER = {"customer_email": "ada@example.com", "items": [{"sku": "BOOK-1", "qty": 1}]}


@pytest.fixture
def blocked_order(app: Flask) -> int:
    """An order whose confirmation notice failed for good, with its shipped notice
    waiting behind it."""
    client = app.test_client()
    order_id = client.post("/orders", json=NEW_ORDER).json["id"]
    assert 200 == client.post(f"/orders/{order_id}/confirm").status_code
    assert 200 == client.post(f"/orders/{order_id}/ship").status_code
    with app.app_context(), db.engine.begin() as conn:
        assert finish(conn, Place(f"order:{order_id}", 1), utcnow(), error="SMTPError: refused")
    return order_id


def test_status_counts_blocked_keys(app: Flask, blocked_order: int) -> None:
    runner = app.test_cli_runner()
    status = json.loads(runner.invoke(args=["outbox", "status", "--json"]).output)
    assert 1 == status["blocked_keys"]
    assert status["oldest_blocked_age_seconds"] >= 0
    text = runner.invoke(args=["outbox", "status"]).output
    assert "1 ordering key(s) blocked" in text
    assert "flask outbox unblock KEY --retry|--skip" in text


def test_keys_lists_the_blocked_key_with_its_task(app: Flask, blocked_order: int) -> None:
    result = app.test_cli_runner().invoke(args=["outbox", "keys", "--blocked", "--json"])
    [key] = json.loads(result.output)
    assert (f"order:{blocked_order}", 1, "orders.notify_customer", "SMTPError: refused", 1) == (
        key["key"],
        key["head_seq"],
        key["task_name"],
        key["blocked_reason"],
        key["held"],
    )
    table = app.test_cli_runner().invoke(args=["outbox", "keys", "--blocked"]).output
    assert f"order:{blocked_order}" in table
    assert "refused" in table  # rich wraps the reason in a narrow terminal


def test_unblock_skip_releases_the_next_task(app: Flask, blocked_order: int) -> None:
    runner = app.test_cli_runner()
    result = runner.invoke(args=["outbox", "unblock", f"order:{blocked_order}", "--skip"])
    assert 0 == result.exit_code, result.output
    assert "skipped task 1" in result.output
    with app.app_context(), db.engine.connect() as conn:
        statuses = list(
            conn.scalars(
                select(outbox_table.c.status)
                .where(outbox_table.c.ordering_key == f"order:{blocked_order}")
                .order_by(outbox_table.c.ordering_seq)
            )
        )
    assert [OutboxStatus.PENDING, OutboxStatus.PENDING] == statuses, (
        "the skipped task is left as it was; the next one is due"
    )
    again = runner.invoke(args=["outbox", "unblock", f"order:{blocked_order}", "--skip"])
    assert 1 == again.exit_code
    assert "is not blocked" in again.output


def test_unblock_needs_to_be_told_what_to_do(app: Flask, blocked_order: int) -> None:
    result = app.test_cli_runner().invoke(args=["outbox", "unblock", f"order:{blocked_order}"])
    assert 2 == result.exit_code
    assert "--retry or --skip" in result.output


def test_metrics_and_dashboard_show_blocked_keys(app: Flask, blocked_order: int) -> None:
    client = app.test_client()
    metrics = client.get("/metrics").text
    assert "celery_outbox_blocked_keys 1.0" in metrics
    relay_ran(app)
    app.config["OUTBOX_DASHBOARD_PUBLIC"] = True
    try:
        page = client.get("/outbox").text
    finally:
        app.config.pop("OUTBOX_DASHBOARD_PUBLIC")
    assert "BLOCKED KEYS" in page
    assert "1 blocked ordering key" in page


def test_a_delivered_orders_timeline_lists_its_notices(app: Flask) -> None:
    """ship and deliver only from the status before them; the timeline is the notices the
    customer received, in the order they were applied."""
    client = app.test_client()
    order_id = client.post("/orders", json=NEW_ORDER).json["id"]
    assert [] == client.get(f"/orders/{order_id}").json["timeline"]
    assert 409 == client.post(f"/orders/{order_id}/ship").status_code, "not confirmed yet"
    assert 409 == client.post(f"/orders/{order_id}/deliver").status_code
    with app.app_context(), capture_tasks(outbox.tasks) as captured:
        client.post(f"/orders/{order_id}/confirm")
        assert 409 == client.post(f"/orders/{order_id}/deliver").status_code, "not shipped"
        shipped = client.post(f"/orders/{order_id}/ship")
        delivered = client.post(f"/orders/{order_id}/deliver")
        captured.run()
    assert ("shipped", ["notification"]) == (shipped.json["status"], list(shipped.json["tasks"]))
    assert "delivered" == delivered.json["status"]
    order = client.get(f"/orders/{order_id}").json
    assert ["confirmed", "shipped", "delivered"] == order["timeline"]
    assert {"notification": 1, "reservation": 1, "shipment": 1} == order["effects"]
