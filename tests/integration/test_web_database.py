"""The example web app through a database outage, on PostgreSQL.

A restarted database leaves every pooled connection dead; the example's engine tests a
connection before handing it to a request, so the first request after the outage
already succeeds. While the database cannot be reached, requests answer 503 JSON with
Retry-After, never a bare 500.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from flask import Flask
from sqlalchemy import Engine, text

from webapp import create_app
from webapp.errors import RETRY_AFTER_SECONDS
from webapp.extensions import db

NEW_ORDER = {"customer_email": "ada@example.com", "items": [{"sku": "BOOK-1", "qty": 1}]}
APPLICATION_NAME = "outbox-web-outage-test"


@pytest.fixture
def web_app(database_url: str) -> Iterator[Flask]:
    """The example app as `create_app()` builds it, its connections tagged for this test."""
    app = create_app(
        {"SQLALCHEMY_DATABASE_URI": f"{database_url}?application_name={APPLICATION_NAME}"}
    )
    yield app
    with app.app_context():
        db.engine.dispose()


@pytest.mark.postgresql
def test_requests_after_the_database_dropped_every_connection_succeed(
    web_app: Flask, engine: Engine
) -> None:
    """pg_terminate_backend on every pooled connection (what a restart does to them): the
    next requests are answered normally."""
    client = web_app.test_client()
    order_id = client.post("/orders", json=NEW_ORDER).json["id"]
    assert 200 == client.get(f"/orders/{order_id}").status_code
    with engine.connect() as conn:
        terminated = conn.execute(
            text(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE application_name = :name"
            ),
            {"name": APPLICATION_NAME},
        ).scalar_one()
    assert terminated >= 1, "the app's pooled connections were found and terminated"
    statuses = [client.get(f"/orders/{order_id}").status_code for _ in range(3)]
    assert [200, 200, 200] == statuses
    assert 200 == client.post(f"/orders/{order_id}/confirm").status_code


def test_a_request_while_the_database_is_unreachable_answers_503_json(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Nothing listens where the database should be: 503, JSON, Retry-After, no trace."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"postgresql+psycopg://orders:secret@127.0.0.1:{port}/orders"
    monkeypatch.setenv("DATABASE_URL", url)
    client = create_app().test_client()
    for response in (client.post("/orders", json=NEW_ORDER), client.get("/orders/1")):
        assert 503 == response.status_code
        assert "application/json" == response.content_type
        assert str(RETRY_AFTER_SECONDS) == response.headers["Retry-After"]
        assert "database_unavailable" == response.json["error"]
        assert "secret" not in response.text
        assert "Traceback" not in response.text
