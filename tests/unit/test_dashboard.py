"""The /outbox dashboard on SQLite: access, health, search, escaping and Flower links."""

from __future__ import annotations

import html
import logging
import re
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from flask import Flask
from flask.testing import FlaskClient
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import update

from outbox import InvalidSettingError, OutboxStatus, RelayKind, outbox_table
from outbox.contrib.dashboard import (
    BASIC_AUTH_KEY,
    PUBLIC_KEY,
    basic_auth_users,
    dashboard_blueprint,
    format_call,
)
from outbox.contrib.flask import Outbox
from outbox.data import store_for
from outbox.enqueue.serialization import to_wire
from outbox.maintenance.heartbeat import Heartbeat
from webapp import create_app
from webapp.extensions import db

NEW_ORDER = {"customer_email": "ada@example.com", "items": [{"sku": "BOOK-1", "qty": 2}]}


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    """A client of the example app with its dashboard opened to everyone (as on a laptop)."""
    app.config[PUBLIC_KEY] = "true"
    return app.test_client()


def relay_ran(app: Flask, seconds_ago: float = 1.0) -> None:
    """Record a relay run, as a sweep or `flask outbox relay` does."""
    with app.app_context():
        heartbeat = Heartbeat(db.engine, store_for(db.engine), RelayKind.SWEEP)
        heartbeat.beat(datetime.now(UTC) - timedelta(seconds=seconds_ago))


def confirm_order(client: FlaskClient) -> tuple[int, dict[str, str]]:
    """A confirmed order: its id and its three task ids."""
    order_id = client.post("/orders", json=NEW_ORDER).json["id"]
    return order_id, client.post(f"/orders/{order_id}/confirm").json["tasks"]


def set_row(app: Flask, task_id: str, **values: Any) -> None:
    with app.app_context(), db.engine.begin() as conn:
        conn.execute(
            update(outbox_table)
            .where(outbox_table.c.task_id == uuid.UUID(task_id))
            .values(**values)
        )


def card(page: str, name: str) -> str:
    """The figure a health card shows."""
    match = re.search(rf'id="stat-{name}">.*?<div class="value">(.*?)</div>', page, re.S)
    assert match, f"no {name} card"
    return html.unescape(match[1]).strip()


def result_ids(page: str) -> list[str]:
    """Task ids listed in the search results, in order."""
    results = page.split('id="results"', 1)[1].split('id="dead"', 1)[0]
    return re.findall(r'class="task-id mono"[^>]*>([0-9a-f-]{36})<', results)


def test_the_dashboard_is_closed_until_it_is_configured(app: Flask) -> None:
    """No setting: 403 with how to open it, and no task data on the page."""
    client = app.test_client()
    order_id = client.post("/orders", json=NEW_ORDER).json["id"]
    client.post(f"/orders/{order_id}/confirm")
    response = client.get("/outbox", query_string={"q": "ada@example.com"})
    assert 403 == response.status_code
    assert f"Set {BASIC_AUTH_KEY}=user:password" in response.text
    assert f"{PUBLIC_KEY}=true" in response.text
    assert "ada@example.com" not in response.text
    assert "orders.notify_customer" not in response.text


def test_the_public_setting_opens_it_to_everyone(client: FlaskClient) -> None:
    """OUTBOX_DASHBOARD_PUBLIC=true: no login asked."""
    response = client.get("/outbox")
    assert 200 == response.status_code
    assert "celery-outbox" in response.text
    assert "text/html; charset=utf-8" == response.content_type


@pytest.mark.parametrize(
    "auth",
    [None, ("ops", "wrong"), ("nobody", "s3cret"), ("ops", "s3cret,admin"), ("admin", "pa")],
)
def test_missing_or_wrong_credentials_get_a_401_challenge(
    app: Flask, client: FlaskClient, auth: tuple[str, str] | None
) -> None:
    """With OUTBOX_DASHBOARD_BASIC_AUTH set, anything but a listed pair is refused."""
    app.config[BASIC_AUTH_KEY] = "ops:s3cret,admin:pa:ss"
    response = client.get("/outbox", auth=auth)
    assert 401 == response.status_code
    assert response.headers["WWW-Authenticate"].startswith('Basic realm="celery-outbox"')
    assert "celery-outbox" not in response.text


@pytest.mark.parametrize("auth", [("ops", "s3cret"), ("admin", "pa:ss")])
def test_each_listed_user_gets_in(app: Flask, client: FlaskClient, auth: tuple[str, str]) -> None:
    """Every user:password pair in the setting works; a password may contain ':'."""
    app.config[BASIC_AUTH_KEY] = "ops:s3cret, admin:pa:ss,"
    assert 200 == client.get("/outbox", auth=auth).status_code


def test_the_setting_is_read_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The example app copies OUTBOX_DASHBOARD_BASIC_AUTH from the environment."""
    monkeypatch.setenv(BASIC_AUTH_KEY, "ops:s3cret")
    app = create_app({"SQLALCHEMY_DATABASE_URI": f"sqlite:///{tmp_path / 'env.sqlite3'}"})
    assert 401 == app.test_client().get("/outbox").status_code


def test_a_malformed_setting_fails_at_start_up_without_echoing_it(tmp_path: Path) -> None:
    """An entry without user:password stops the app; the message names it, not its secret."""
    with pytest.raises(InvalidSettingError, match="entry 2 is not user:password") as raised:
        create_app(
            {
                "SQLALCHEMY_DATABASE_URI": f"sqlite:///{tmp_path / 'bad.sqlite3'}",
                BASIC_AUTH_KEY: "ops:s3cret,hunter2",
            }
        )
    assert "hunter2" not in str(raised.value)
    assert () == basic_auth_users({BASIC_AUTH_KEY: " , "})


def test_health_cards_show_the_outbox_figures(app: Flask, client: FlaskClient) -> None:
    """Pending, due, dead, last minute's dispatches and the status come from the table."""
    relay_ran(app)
    _, tasks = confirm_order(client)
    now = datetime.now(UTC)
    set_row(app, tasks["notification"], status=OutboxStatus.DISPATCHED, dispatched_at=now)
    set_row(app, tasks["shipment"], available_at=now + timedelta(hours=1))
    page = client.get("/outbox").text
    assert ("OK", "2", "1", "0", "1") == tuple(
        card(page, name) for name in ("health", "pending", "due", "dead", "throughput")
    )
    # The relay ran a second before the page was asked for, plus however long that took.
    relay_age = re.fullmatch(r"(\d+\.\d)s ago", card(page, "relay"))
    assert relay_age is not None
    assert 1.0 <= float(relay_age[1]) < 10.0
    assert "No dead rows." in page


def test_no_relay_having_run_is_the_headline(app: Flask, client: FlaskClient) -> None:
    """Nothing publishes the outbox: NO RELAY, saying what to start, even with nothing due."""
    page = client.get("/outbox").text
    assert ("NO RELAY", "never") == (card(page, "health"), card(page, "relay"))
    assert "no relay or sweep has run yet" in page
    relay_ran(app, seconds_ago=90)
    page = client.get("/outbox").text
    assert "NO RELAY" == card(page, "health")
    assert "no relay or sweep has run for 90s" in page


def test_a_dead_row_is_listed_with_its_error(app: Flask, client: FlaskClient) -> None:
    """DEAD ROWS status, and the row's task, id, attempts, deliveries, last error."""
    relay_ran(app)
    _, tasks = confirm_order(client)
    set_row(
        app,
        tasks["reservation"],
        status=OutboxStatus.DEAD,
        attempts=10,
        deliveries=3,
        last_error="NotRegistered: 'orders.reserve_stock'",
    )
    page = client.get("/outbox").text
    assert ("DEAD ROWS", "1") == (card(page, "health"), card(page, "dead"))
    dead = page.split('id="dead"', 1)[1]
    assert tasks["reservation"] in dead
    assert "NotRegistered: &#39;orders.reserve_stock&#39;" in dead
    assert '<td class="num">10</td>\n          <td class="num">3</td>' in dead


def test_a_due_row_older_than_the_health_limit_is_lagging(app: Flask, client: FlaskClient) -> None:
    """The status uses OUTBOX_HEALTH_MAX_LAG, the threshold /healthz fails on."""
    relay_ran(app)
    _, tasks = confirm_order(client)
    set_row(app, tasks["shipment"], available_at=datetime.now(UTC) - timedelta(seconds=90))
    app.config["OUTBOX_HEALTH_MAX_LAG"] = 120
    assert "OK" == card(client.get("/outbox").text, "health")
    app.config["OUTBOX_HEALTH_MAX_LAG"] = 60
    page = client.get("/outbox").text
    assert "LAGGING" == card(page, "health")
    assert "(limit 60s)" in page


def test_searching_an_order_id_lists_its_three_tasks(client: FlaskClient) -> None:
    """The order id is every task's argument: its three tasks, newest first, no others."""
    order_id, tasks = confirm_order(client)
    confirm_order(client)
    page = client.get("/outbox", query_string={"q": str(order_id)}).text
    expected = [tasks["shipment"], tasks["reservation"], tasks["notification"]]
    assert expected == result_ids(page)
    assert "3 tasks" in page


def test_searching_a_task_id_shows_that_row_with_its_lifecycle(
    app: Flask, client: FlaskClient
) -> None:
    """One row, with what the worker reported: state, runs and the task's error."""
    _, tasks = confirm_order(client)
    started = datetime.now(UTC) - timedelta(seconds=5)
    set_row(
        app,
        tasks["shipment"],
        status=OutboxStatus.DISPATCHED,
        dispatched_at=started,
        task_state="RETRY",
        task_runs=2,
        task_started_at=started,
        task_finished_at=started + timedelta(seconds=1.5),
        task_error="ConnectionError: carrier timed out",
    )
    page = client.get("/outbox", query_string={"q": tasks["shipment"]}).text
    assert [tasks["shipment"]] == result_ids(page)
    results = page.split('id="results"', 1)[1].split('id="dead"', 1)[0]
    for text in ("RETRY", "2 runs", "took 1.5s", "ConnectionError: carrier timed out"):
        assert text in results


def test_markup_in_errors_and_the_search_is_shown_as_text(app: Flask, client: FlaskClient) -> None:
    """A task error holding <script> is escaped, as is the search text echoed back."""
    order_id, tasks = confirm_order(client)
    set_row(app, tasks["notification"], task_error="ValueError: <script>alert(1)</script>")
    page = client.get("/outbox", query_string={"q": str(order_id)}).text
    assert "<script>" not in page
    assert "ValueError: &lt;script&gt;alert(1)&lt;/script&gt;" in page
    echoed = client.get("/outbox", query_string={"q": '"><b>x</b>'}).text
    assert "<b>x</b>" not in echoed
    assert "&lt;b&gt;x&lt;/b&gt;" in echoed


def test_the_page_forbids_scripts_and_caching(client: FlaskClient) -> None:
    """A Content-Security-Policy without script sources; the inline style carries a nonce."""
    response = client.get("/outbox")
    policy = response.headers["Content-Security-Policy"]
    assert policy.startswith("default-src 'none'")
    assert "script-src" not in policy
    nonce = re.search(r"'nonce-([^']+)'", policy)
    assert nonce
    assert f'<style nonce="{nonce[1]}">' in response.text
    assert "no-store" == response.headers["Cache-Control"]


def test_task_ids_link_to_flower_only_when_it_is_configured(
    app: Flask, client: FlaskClient
) -> None:
    """OUTBOX_FLOWER_URL turns each task id into a link to its Flower page."""
    order_id, tasks = confirm_order(client)
    page = client.get("/outbox", query_string={"q": str(order_id)}).text
    assert "/task/" not in page
    app.config["OUTBOX_FLOWER_URL"] = "http://flower.example:5555/"
    page = client.get("/outbox", query_string={"q": str(order_id)}).text
    for task_id in tasks.values():
        assert f'href="http://flower.example:5555/task/{task_id}"' in page


@pytest.mark.parametrize(
    ("query", "message"),
    [("x" * 300, "of at most 200"), ("42\x01", "contains control characters")],
)
def test_an_unsearchable_query_gets_a_400_with_the_reason(
    client: FlaskClient, query: str, message: str
) -> None:
    """Bad input is answered on the page, not with a server error."""
    response = client.get("/outbox", query_string={"q": query})
    assert 400 == response.status_code
    assert message in response.text
    assert 'id="stat-health"' in response.text


def test_a_search_that_finds_nothing_says_so(client: FlaskClient) -> None:
    """No match: an empty result, not an error."""
    response = client.get("/outbox", query_string={"q": "nobody@example.com"})
    assert 200 == response.status_code
    assert "No task has the id or an argument equal to" in response.text


def test_arguments_read_as_a_call_with_tagged_values_decoded() -> None:
    """Stored JSON is shown as call arguments; Decimal/UUID tags as the values they carry."""
    customer = uuid.UUID(int=7)
    args = to_wire([42, "BOOK-1", customer], where="args")
    kwargs = to_wire({"amount": Decimal("59.90"), "tag": {"__type__": "nonsense"}}, where="kwargs")
    assert (
        f'42, "BOOK-1", UUID("{customer}"), amount=Decimal("59.90"), tag={{"__type__": "nonsense"}}'
    ) == format_call(args, kwargs)


def test_any_app_with_the_extension_can_mount_the_dashboard(
    tmp_path: Path, celery_app: Celery
) -> None:
    """The blueprint needs only the Outbox extension; its prefix is normalised."""
    shop = Flask("shop")
    shop.config["SQLALCHEMY_DATABASE_URI"] = f"sqlite:///{tmp_path / 'shop.sqlite3'}"
    shop_db = SQLAlchemy()
    shop_db.init_app(shop)
    extension = Outbox(shop, shop_db, celery=celery_app)
    shop.config[PUBLIC_KEY] = True
    shop.register_blueprint(dashboard_blueprint("ops/outbox/"))
    with shop.app_context():
        extension.create_tables()
    response = shop.test_client().get("/ops/outbox", query_string={"q": "42"})
    assert 200 == response.status_code
    assert '<span class="app">shop</span>' in response.text
    assert 'action="/ops/outbox"' in response.text


def test_a_dashboard_opened_to_everyone_is_announced_at_start_up(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """OUTBOX_DASHBOARD_PUBLIC=true logs a warning; a closed or protected one logs nothing."""
    caplog.set_level(logging.WARNING, logger="outbox.contrib.dashboard")
    public = Flask("public")
    public.config[PUBLIC_KEY] = "true"
    public.register_blueprint(dashboard_blueprint())
    assert "OUTBOX_DASHBOARD_PUBLIC=true: the outbox dashboard at /outbox" in caplog.text
    caplog.clear()
    for name, config in (("closed", {}), ("protected", {BASIC_AUTH_KEY: "ops:secret"})):
        app = Flask(name)
        app.config.update(config)
        app.register_blueprint(dashboard_blueprint())
    assert "" == caplog.text
