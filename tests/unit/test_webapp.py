"""The orders API on SQLite: validation, status codes and what confirming enqueues."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select

from outbox import OutboxMessage, OutboxStatus
from webapp.extensions import db, outbox

NEW_ORDER = {"customer_email": "ada@example.com", "items": [{"sku": "BOOK-1", "qty": 2}]}


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def outbox_rows(app: Flask) -> list[OutboxMessage]:
    with app.app_context():
        return list(db.session.scalars(select(OutboxMessage).order_by(OutboxMessage.id)))


def test_create_order_returns_201_with_a_pending_order(client: FlaskClient) -> None:
    """POST /orders creates a pending order and returns it."""
    response = client.post("/orders", json=NEW_ORDER)
    assert 201 == response.status_code
    assert "pending" == response.json["status"]
    assert isinstance(response.json["id"], int)


def test_confirm_enqueues_three_tasks_in_the_same_transaction(
    client: FlaskClient, app: Flask
) -> None:
    """Confirming writes the status change and three outbox rows; their ids are returned."""
    order_id = client.post("/orders", json=NEW_ORDER).json["id"]
    response = client.post(f"/orders/{order_id}/confirm")
    assert 200 == response.status_code
    assert "confirmed" == response.json["status"]
    rows = outbox_rows(app)
    assert [
        "orders.notify_customer",
        "orders.reserve_stock",
        "orders.prepare_shipment",
    ] == [row.task_name for row in rows]
    assert [[order_id, "confirmed"], [order_id], [order_id]] == [row.args for row in rows]
    assert [f"order:{order_id}", None, None] == [row.ordering_key for row in rows]
    assert all(row.status == OutboxStatus.PENDING for row in rows)
    assert sorted(response.json["tasks"].values()) == sorted(str(row.task_id) for row in rows)


def test_confirming_twice_is_a_conflict_and_enqueues_nothing_more(
    client: FlaskClient, app: Flask
) -> None:
    """The second confirm is a 409 with a JSON body and no second set of tasks."""
    order_id = client.post("/orders", json=NEW_ORDER).json["id"]
    client.post(f"/orders/{order_id}/confirm")
    response = client.post(f"/orders/{order_id}/confirm")
    assert 409 == response.status_code
    assert "conflict" == response.json["error"]
    assert 3 == len(outbox_rows(app))


def test_get_order_shows_zero_effects_before_any_task_ran(client: FlaskClient) -> None:
    """Effects are counted per order, so "ran once" is visible through the API."""
    order_id = client.post("/orders", json=NEW_ORDER).json["id"]
    body = client.get(f"/orders/{order_id}").json
    assert {"notification": 0, "reservation": 0, "shipment": 0} == body["effects"]


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("get", "/orders/999"),
        ("post", "/orders/999/confirm"),
        ("get", f"/orders/{2**64}"),
        ("post", f"/orders/{2**64}/confirm"),
        ("get", f"/orders/{2**31}"),
    ],
)
def test_unknown_order_is_404_json(client: FlaskClient, method: str, path: str) -> None:
    """Unknown ids, including ones too large for the database, are a JSON 404."""
    response = getattr(client, method)(path)
    assert 404 == response.status_code
    assert "not_found" == response.json["error"]


@pytest.mark.parametrize(
    "body",
    [
        "{not json",
        "[]",
        "null",
        json.dumps({"items": NEW_ORDER["items"]}),
        json.dumps({**NEW_ORDER, "customer_email": "nobody"}),
        json.dumps({**NEW_ORDER, "customer_email": 42}),
        json.dumps({**NEW_ORDER, "items": []}),
        json.dumps({**NEW_ORDER, "items": "BOOK-1"}),
        json.dumps({**NEW_ORDER, "items": [{"sku": "BOOK-1"}]}),
        json.dumps({**NEW_ORDER, "items": [{"sku": "BOOK-1", "qty": 0}]}),
        json.dumps({**NEW_ORDER, "items": [{"sku": "BOOK-1", "qty": True}]}),
        json.dumps({**NEW_ORDER, "items": [{"sku": "", "qty": 1}]}),
        json.dumps({**NEW_ORDER, "items": [["BOOK-1", 1]]}),
        json.dumps({**NEW_ORDER, "customer_email": "a\u0000@example.com"}),
        json.dumps({**NEW_ORDER, "customer_email": "a\ud800@example.com"}),
        json.dumps({**NEW_ORDER, "items": [{"sku": "BOOK\u0000", "qty": 1}]}),
        "[" * 100_000 + "]" * 100_000,
    ],
)
def test_bad_input_is_400_json_and_creates_nothing(
    client: FlaskClient, app: Flask, body: str
) -> None:
    """Malformed JSON or missing/invalid fields are a 400 with an explanation, never a 500."""
    response = client.post("/orders", data=body, content_type="application/json")
    assert 400 == response.status_code
    assert "invalid_request" == response.json["error"]
    assert response.json["message"]
    with app.app_context():
        assert 0 == db.session.scalar(
            select(db.func.count()).select_from(db.metadata.tables["orders"])
        )


def test_unknown_route_and_method_are_json(client: FlaskClient) -> None:
    """Even framework errors come back as JSON."""
    assert "not_found" == client.get("/nope").json["error"]
    response = client.delete("/orders/1")
    assert 405 == response.status_code
    assert "method_not_allowed" == response.json["error"]


def test_init_db_is_idempotent(app: Flask) -> None:
    """Running init-db twice succeeds and keeps the data."""
    runner = app.test_cli_runner()
    first = runner.invoke(args=["init-db"])
    app.test_client().post("/orders", json=NEW_ORDER)
    second = runner.invoke(args=["init-db"])
    assert (0, 0) == (first.exit_code, second.exit_code), first.output + second.output
    assert "tables ready" in second.output
    assert 200 == app.test_client().get("/orders/1").status_code


def test_outbox_status_json_counts_rows(client: FlaskClient, app: Flask) -> None:
    """`flask outbox status --json` prints the counts and the lag as one JSON object."""
    order_id = client.post("/orders", json=NEW_ORDER).json["id"]
    client.post(f"/orders/{order_id}/confirm")
    result = app.test_cli_runner().invoke(args=["outbox", "status", "--json"])
    assert 0 == result.exit_code, result.output
    status: dict[str, Any] = json.loads(result.output)
    assert {"pending": 3, "due": 3, "dead": 0} == {
        key: status[key] for key in ("pending", "due", "dead")
    }
    assert status["oldest_pending_age_seconds"] >= 0
    # SQLite's estimate is the span of row ids: exact on a table nothing was deleted from.
    assert 0 == status["dispatched_estimate"]


def test_outbox_status_says_when_no_relay_runs(client: FlaskClient, app: Flask) -> None:
    """With no sweep or relay having run, the status says so and what to start."""
    result = app.test_cli_runner().invoke(args=["outbox", "status", "--json"])
    status = json.loads(result.output)
    assert status["last_relay_run_seconds_ago"] is None
    [problem] = status["problems"]
    assert problem.startswith("no relay or sweep has run yet: start a Celery worker")
    table = app.test_cli_runner().invoke(args=["outbox", "status"]).output
    assert "no relay or sweep has run yet" in table
    with app.app_context():
        outbox.relay.maintain()
    status = json.loads(app.test_cli_runner().invoke(args=["outbox", "status", "--json"]).output)
    assert [] == status["problems"]
    assert ["sweep"] == [relay["kind"] for relay in status["relays"]]


def test_outbox_status_table_is_readable(app: Flask) -> None:
    """Without --json the status is a table a person can read."""
    result = app.test_cli_runner().invoke(args=["outbox", "status"])
    assert 0 == result.exit_code, result.output
    assert "pending" in result.output
    assert "dispatched (estimate)" in result.output, "a figure that is not counted says so"
    assert "oldest due pending row: none" in result.output


def test_outbox_status_breaks_counts_down_per_task(client: FlaskClient, app: Flask) -> None:
    """The JSON status has counts per task name and the last minute's dispatch count."""
    order_id = client.post("/orders", json=NEW_ORDER).json["id"]
    client.post(f"/orders/{order_id}/confirm")
    result = app.test_cli_runner().invoke(args=["outbox", "status", "--json"])
    status = json.loads(result.output)
    assert {"pending": 1} == status["by_task"]["orders.reserve_stock"]
    assert 3 == len(status["by_task"])
    assert 0 == status["dispatched_last_minute"]
    table = app.test_cli_runner().invoke(args=["outbox", "status"]).output
    assert "orders.prepare_shipment" in table
    assert "dispatched in the last minute: 0" in table


def test_outbox_inspect_shows_a_task_and_its_flower_page(client: FlaskClient, app: Flask) -> None:
    """`flask outbox inspect TASK_ID` prints the row and links Flower when configured."""
    order_id = client.post("/orders", json=NEW_ORDER).json["id"]
    task_id = client.post(f"/orders/{order_id}/confirm").json["tasks"]["shipment"]
    app.config["OUTBOX_FLOWER_URL"] = "http://flower.example:5555/"
    result = app.test_cli_runner().invoke(args=["outbox", "inspect", task_id, "--json"])
    assert 0 == result.exit_code, result.output
    details = json.loads(result.output)
    assert ("orders.prepare_shipment", "pending", 0, 0) == (
        details["task_name"],
        details["status"],
        details["attempts"],
        details["deliveries"],
    )
    assert [order_id] == details["args"]
    assert f"http://flower.example:5555/task/{task_id}" == details["flower_url"]
    text = app.test_cli_runner().invoke(args=["outbox", "inspect", task_id]).output
    assert "orders.prepare_shipment" in text


def test_outbox_inspect_of_an_unknown_task_says_so(app: Flask) -> None:
    """An id that is not in the outbox is an error naming it."""
    unknown = "00000000-0000-0000-0000-000000000000"
    result = app.test_cli_runner().invoke(args=["outbox", "inspect", unknown])
    assert 1 == result.exit_code
    assert f"no outbox row has task id {unknown}" in result.output


def test_the_example_redelivers_what_a_dead_worker_held_within_about_a_minute() -> None:
    """Redis gives back a dead worker's messages after 60 s, looked for every 5 s, and its
    restore lock lasts 30 s: the settings the README's redelivery figures rest on."""
    from webapp.config import REDIS_TRANSPORT_OPTIONS

    assert {
        "visibility_timeout": 60,
        "unacked_restore_interval": 5,
        "unacked_restore_throttle": 1,
        "unacked_mutex_expire": 30,
    }.items() <= REDIS_TRANSPORT_OPTIONS.items()


def test_the_example_tests_pooled_connections_except_on_sqlite() -> None:
    """pool_pre_ping on a server database; SQLite has no connection to lose."""
    from webapp.config import engine_options

    assert engine_options("postgresql+psycopg://u@h/db")["pool_pre_ping"] is True
    assert "pool_pre_ping" not in engine_options("sqlite:///:memory:")


def test_init_db_says_plainly_when_the_tables_are_from_an_older_version(app: Flask) -> None:
    """A ./var made before a column was added: init-db names the columns and the fix,
    instead of the app failing later on its first query."""
    from sqlalchemy import text

    from webapp.extensions import db

    with app.app_context(), db.engine.begin() as conn:
        conn.execute(text("ALTER TABLE notifications DROP COLUMN event"))
    result = app.test_cli_runner().invoke(args=["init-db"])
    assert 1 == result.exit_code
    assert "notifications.event" in result.output
    assert "delete its folder" in result.output


def order_count(app: Flask) -> int:
    with app.app_context():
        return int(
            db.session.scalar(select(db.func.count()).select_from(db.metadata.tables["orders"]))
        )


@pytest.fixture
def commit_answer_lost(app: Flask) -> Iterator[None]:
    """Every commit of the app's sessions goes through, and then its answer is lost: what
    a connection dropped in the middle of COMMIT looks like to the request."""
    from sqlalchemy import event
    from sqlalchemy.exc import OperationalError

    def lose_the_answer(_session: Any) -> None:
        raise OperationalError("COMMIT", {}, ConnectionResetError("connection reset by peer"))

    event.listen(db.session, "after_commit", lose_the_answer)
    yield
    event.remove(db.session, "after_commit", lose_the_answer)


def test_a_503_after_a_cut_off_commit_says_the_outcome_is_unknown(
    client: FlaskClient, app: Flask, commit_answer_lost: None
) -> None:
    """The commit may have gone through (here it did): the 503 must not say nothing was
    changed, and says how to retry safely."""
    response = client.post("/orders", json=NEW_ORDER)
    assert 503 == response.status_code
    assert "database_unavailable" == response.json["error"]
    assert "nothing was changed" not in response.json["message"]
    assert "unknown" in response.json["message"]
    assert "Idempotency-Key" in response.json["message"]
    assert 1 == order_count(app), "the commit went through"


def test_a_get_that_fails_on_the_database_says_nothing_was_changed(
    tmp_path: Path,
) -> None:
    """A GET changes nothing, whatever happened to its connection: its 503 says so."""
    from webapp import create_app

    unreachable = f"sqlite:///{tmp_path / 'no-such-folder' / 'orders.sqlite3'}"
    app = create_app({"SQLALCHEMY_DATABASE_URI": unreachable, "SQLALCHEMY_ENGINE_OPTIONS": {}})
    response = app.test_client().get("/orders/1")
    assert 503 == response.status_code
    assert "nothing was changed" in response.json["message"]


def test_a_retry_with_the_same_idempotency_key_returns_the_order_a_cut_off_commit_made(
    client: FlaskClient, app: Flask, commit_answer_lost: None
) -> None:
    """The client cannot know whether its order was made; sending it again with the same
    key answers with that order (a replay commits nothing) instead of making a second."""
    headers = {"Idempotency-Key": "order-7f3a"}
    assert 503 == client.post("/orders", json=NEW_ORDER, headers=headers).status_code
    retried = client.post("/orders", json=NEW_ORDER, headers=headers)
    assert 200 == retried.status_code, retried.json
    assert 1 == order_count(app)


def test_the_same_idempotency_key_and_body_return_the_first_order(
    client: FlaskClient, app: Flask
) -> None:
    """201 the first time, then 200 with the same order and Idempotent-Replayed: true;
    one order in all."""
    headers = {"Idempotency-Key": "b7c9e0d2-5a4f-4c39-9d0e-3f1a2b6c8d90"}
    first = client.post("/orders", json=NEW_ORDER, headers=headers)
    again = client.post("/orders", json=NEW_ORDER, headers=headers)
    assert (201, 200) == (first.status_code, again.status_code)
    assert first.json == again.json
    assert "true" == again.headers["Idempotent-Replayed"]
    assert "Idempotent-Replayed" not in first.headers
    assert 1 == order_count(app)


def test_a_replay_is_the_same_order_however_its_json_is_written(client: FlaskClient) -> None:
    """The key stands for the order asked for: the same fields re-serialised by a client's
    retry (key order, spacing) are the same request."""
    headers = {"Idempotency-Key": "k-1"}
    first = client.post("/orders", json=NEW_ORDER, headers=headers)
    body = json.dumps({"items": NEW_ORDER["items"], "customer_email": "ada@example.com"}, indent=2)
    again = client.post("/orders", data=body, content_type="application/json", headers=headers)
    assert (201, 200) == (first.status_code, again.status_code)
    assert first.json["id"] == again.json["id"]


def test_the_same_idempotency_key_with_another_body_is_422(client: FlaskClient, app: Flask) -> None:
    """A key reused for a different order is refused, naming the key, and makes nothing."""
    headers = {"Idempotency-Key": "k-2"}
    assert 201 == client.post("/orders", json=NEW_ORDER, headers=headers).status_code
    other = {**NEW_ORDER, "items": [{"sku": "BOOK-2", "qty": 1}]}
    response = client.post("/orders", json=other, headers=headers)
    assert 422 == response.status_code
    assert "idempotency_key_reused" == response.json["error"]
    assert "'k-2'" in response.json["message"]
    assert 1 == order_count(app)


def test_orders_without_a_key_or_with_different_keys_are_separate(
    client: FlaskClient, app: Flask
) -> None:
    """The key is opt-in: without it every POST makes an order, as before."""
    codes = [
        client.post("/orders", json=NEW_ORDER).status_code,
        client.post("/orders", json=NEW_ORDER).status_code,
        client.post("/orders", json=NEW_ORDER, headers={"Idempotency-Key": "a"}).status_code,
        client.post("/orders", json=NEW_ORDER, headers={"Idempotency-Key": "b"}).status_code,
    ]
    assert [201] * 4 == codes
    assert 4 == order_count(app)


@pytest.mark.parametrize("key", ["", "x" * 256, "tab\there"])
def test_a_malformed_idempotency_key_is_400(client: FlaskClient, app: Flask, key: str) -> None:
    """An empty, over-long or unprintable key is refused before anything is made."""
    response = client.post("/orders", json=NEW_ORDER, headers={"Idempotency-Key": key})
    assert 400 == response.status_code
    assert "invalid_request" == response.json["error"]
    assert "Idempotency-Key" in response.json["message"]
    assert 0 == order_count(app)


def test_a_body_over_the_limit_is_413_json_and_creates_nothing(
    client: FlaskClient, app: Flask
) -> None:
    """A valid order padded past 1 MiB is refused with a JSON 413 before it is parsed."""
    body = json.dumps({**NEW_ORDER, "note": "x" * (1024 * 1024)})
    response = client.post("/orders", data=body, content_type="application/json")
    assert 413 == response.status_code
    assert "request_entity_too_large" == response.json["error"]
    assert 0 == order_count(app)


def test_the_body_limit_is_one_mib_unless_the_environment_sets_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """ORDERS_MAX_CONTENT_LENGTH (bytes) sets Flask's MAX_CONTENT_LENGTH; a bad value is
    an error naming it."""
    from webapp.config import flask_config

    monkeypatch.delenv("ORDERS_MAX_CONTENT_LENGTH", raising=False)
    assert 1024 * 1024 == flask_config()["MAX_CONTENT_LENGTH"]
    monkeypatch.setenv("ORDERS_MAX_CONTENT_LENGTH", "2048")
    assert 2048 == flask_config()["MAX_CONTENT_LENGTH"]
    monkeypatch.setenv("ORDERS_MAX_CONTENT_LENGTH", "1MB")
    with pytest.raises(ValueError, match="ORDERS_MAX_CONTENT_LENGTH='1MB'"):
        flask_config()
