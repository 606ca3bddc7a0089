"""The /outbox dashboard in a real browser, on PostgreSQL.

Set ``OUTBOX_DASHBOARD_SCREENSHOT=docs/images/dashboard.png`` to also save the page the
test screenshots (the README's picture) there.
"""

from __future__ import annotations

import os
import shutil
import struct
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from playwright.sync_api import Browser, HttpCredentials, Page, ViewportSize
from playwright.sync_api import Error as PlaywrightError
from sqlalchemy import Connection, Engine, insert, update

from outbox import OutboxStatus, collect_stats, outbox_table
from outbox.clock import utcnow
from outbox.contrib.dashboard import BASIC_AUTH_KEY
from outbox.enqueue.serialization import to_wire
from tasks.orders import notify_customer
from webapp.extensions import db, outbox

USER, PASSWORD = "ops", "correct horse"
FLOWER = "http://flower.internal:5555"
VIEWPORT: ViewportSize = {"width": 1280, "height": 800}
CUSTOMERS = ["ada@example.com", "grace@example.com", "edsger@example.com", "barbara@example.com"]
ITEM = {"sku": "BOOK-1", "qty": 1}
DEAD_ERROR = "task 'billing.charge_card' is not registered with the relay's app"
RETRY_ERROR = "ConnectionError: carrier API timed out after 10.0s"


@dataclass(frozen=True)
class Seeded:
    """What the test put in the database."""

    #: The order whose three tasks ran (one of them retrying) in the last minute.
    order_id: int
    #: Its task ids by name ("notification", "reservation", "shipment").
    tasks: dict[str, str]


@pytest.fixture
def dashboard_app(app: Flask, monkeypatch: pytest.MonkeyPatch) -> Flask:
    """The session app with a dashboard login and a Flower URL, for this test only."""
    monkeypatch.setitem(app.config, BASIC_AUTH_KEY, f"{USER}:{PASSWORD}")
    monkeypatch.setitem(app.config, "OUTBOX_FLOWER_URL", FLOWER)
    return app


@pytest.fixture
def seeded(dashboard_app: Flask, engine: Engine) -> Seeded:
    """Orders in every state the dashboard shows, written through the API where it can be.

    Order 1's tasks ran 40 s ago (the shipment is retrying after a carrier timeout),
    order 2's were just confirmed and wait for the relay, order 3's ran minutes ago, a
    reminder for order 4 waits for its countdown, and a charge for order 3 is dead.
    """
    client = dashboard_app.test_client()
    new_orders = [
        client.post("/orders", json={"customer_email": email, "items": [ITEM]})
        for email in CUSTOMERS
    ]
    orders = [response.json["id"] for response in new_orders]
    tasks = {order: client.post(f"/orders/{order}/confirm").json["tasks"] for order in orders[:3]}
    with dashboard_app.app_context():
        outbox.apply_async(notify_customer, args=(orders[3],), countdown=600)
        db.session.commit()
    now = utcnow()
    t = outbox_table.c

    def ran(conn: Connection, task_id: str, ago: float, took: float, **values: Any) -> None:
        enqueued = now - timedelta(seconds=ago + 0.6)
        started = now - timedelta(seconds=ago - 0.05)
        conn.execute(
            update(outbox_table)
            .where(t.task_id == uuid.UUID(task_id))
            .values(
                {
                    "status": OutboxStatus.DISPATCHED,
                    "deliveries": 1,
                    "created_at": enqueued,
                    "available_at": enqueued,
                    "dispatched_at": now - timedelta(seconds=ago),
                    "task_state": "SUCCESS",
                    "task_runs": 1,
                    "task_started_at": started,
                    "task_finished_at": started + timedelta(seconds=took),
                    **values,
                }
            )
        )

    with dashboard_app.app_context():
        outbox.relay.heartbeat.beat(now - timedelta(seconds=0.8))
    with engine.begin() as conn:
        first, third = tasks[orders[0]], tasks[orders[2]]
        ran(conn, first["notification"], 40, 0.21)
        ran(conn, first["reservation"], 40, 0.08)
        ran(
            conn,
            first["shipment"],
            40,
            10.02,
            task_state="RETRY",
            task_runs=2,
            task_error=RETRY_ERROR,
        )
        for task_id in third.values():
            ran(conn, task_id, 200, 0.12)
        enqueued = now - timedelta(hours=2)
        conn.execute(
            insert(outbox_table).values(
                task_id=uuid.uuid4(),
                task_name="billing.charge_card",
                args=[],
                kwargs={
                    "order_id": orders[2],
                    "amount": to_wire(Decimal("59.90"), where="kwargs"),
                },
                options={},
                status=OutboxStatus.DEAD,
                attempts=10,
                last_error=DEAD_ERROR,
                created_at=enqueued,
                available_at=enqueued,
            )
        )
    return Seeded(order_id=orders[0], tasks=tasks[orders[0]])


@pytest.fixture
def page(browser: Browser, base_url: str) -> Iterator[Page]:
    """A page logged in to the dashboard, failing the test if it loads anything external."""
    context = browser.new_context(
        base_url=base_url,
        viewport=VIEWPORT,
        http_credentials={"username": USER, "password": PASSWORD},
    )
    requested: list[str] = []
    context.on("request", lambda request: requested.append(request.url))
    yield context.new_page()
    context.close()
    outside = [url for url in requested if not url.startswith((base_url, "data:"))]
    assert [] == outside, "the dashboard must render from the app alone"


@pytest.mark.parametrize("password", [None, "wrong"])
def test_without_credentials_the_dashboard_answers_401(
    dashboard_app: Flask, browser: Browser, base_url: str, password: str | None
) -> None:
    """No login or a wrong one: the basic-auth challenge, never the page."""
    credentials = None if password is None else HttpCredentials(username=USER, password=password)
    context = browser.new_context(base_url=base_url, http_credentials=credentials)
    page = context.new_page()
    try:
        with page.expect_response("**/outbox") as challenge:
            if credentials is None:
                # With no credentials to offer, Playwright abandons the navigation.
                with pytest.raises(PlaywrightError, match="ERR_INVALID_AUTH_CREDENTIALS"):
                    page.goto("/outbox")
            else:
                page.goto("/outbox")
                assert "Authentication required." == page.locator("body").inner_text().strip()
        assert 401 == challenge.value.status
        assert challenge.value.headers["www-authenticate"].startswith("Basic ")
    finally:
        context.close()


def test_an_operator_reads_the_health_and_finds_an_order_and_a_task(
    page: Page, seeded: Seeded, engine: Engine, tmp_path: Path
) -> None:
    """Health figures match the table; the order's search lists its 3 tasks with Flower
    links; a task id finds one row; the page screenshots as a real PNG."""
    response = page.goto("/outbox")
    assert response is not None
    assert 200 == response.status
    stats = collect_stats(engine, utcnow())
    assert (4, 3, 1, 3) == (stats.pending, stats.due, stats.dead, stats.dispatched_last_minute)
    shown = {
        name: page.locator(f"#stat-{name} .value").inner_text()
        for name in ("health", "pending", "due", "dead", "throughput")
    }
    assert {
        "health": "DEAD ROWS",
        "pending": str(stats.pending),
        "due": str(stats.due),
        "dead": str(stats.dead),
        "throughput": str(stats.dispatched_last_minute),
    } == shown
    dead = page.locator("#dead tr.dead-row")
    assert 1 == dead.count()
    assert DEAD_ERROR in dead.inner_text()
    assert "billing.charge_card" in dead.inner_text()

    page.get_by_label("Task id or argument value").fill(str(seeded.order_id))
    page.get_by_role("button", name="Search").click()
    page.wait_for_url(f"**/outbox?q={seeded.order_id}")
    links = page.locator("#results tr.result a.task-id")
    expected = [seeded.tasks[name] for name in ("shipment", "reservation", "notification")]
    assert expected == links.all_inner_texts()
    assert [f"{FLOWER}/task/{task_id}" for task_id in expected] == [
        links.nth(i).get_attribute("href") for i in range(links.count())
    ]
    results = page.locator("#results").inner_text()
    assert RETRY_ERROR in results
    assert "RETRY" in results
    assert "SUCCESS" in results

    screenshot = tmp_path / "dashboard.png"
    page.screenshot(path=screenshot, full_page=True)
    width, height = png_size(screenshot)
    assert VIEWPORT["width"] == width
    assert 600 < height < 4000
    assert screenshot.stat().st_size > 20_000
    if target := os.environ.get("OUTBOX_DASHBOARD_SCREENSHOT"):
        shutil.copyfile(screenshot, target)

    page.goto(f"/outbox?q={seeded.tasks['reservation']}")
    rows = page.locator("#results tr.result")
    assert 1 == rows.count()
    assert "orders.reserve_stock" in rows.inner_text()


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's header, which must be a real PNG's."""
    header = path.read_bytes()[:24]
    assert b"\x89PNG\r\n\x1a\n" == header[:8], f"{path} is not a PNG"
    assert b"IHDR" == header[12:16]
    width, height = struct.unpack(">II", header[16:24])
    return width, height
