"""/metrics and /healthz on the real services."""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from celery import Celery
from flask import Flask
from sqlalchemy import Engine, insert, update
from sqlalchemy.orm import Session

from outbox import Relay, TaskOutbox, outbox_table
from outbox.contrib.monitoring import CACHE_SECONDS_KEY
from outbox.data.schema import relays_table


@pytest.fixture(autouse=True)
def fresh_health(app: Flask) -> Iterator[None]:
    """Every /healthz here checks anew: these tests change the outbox between requests
    well within the answer's cache time (what the cache saves is pinned by the unit
    tests of ``/healthz``)."""
    app.config[CACHE_SECONDS_KEY] = 0
    yield
    app.config.pop(CACHE_SECONDS_KEY)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def metric(body: str, name: str, labels: str = "", default: float | None = None) -> float:
    match = re.search(rf"^{re.escape(name + labels)} ([0-9.e+-]+)$", body, re.M)
    if match is None and default is not None:
        return default
    assert match, f"{name}{labels} missing from /metrics"
    return float(match[1])


def enqueue(engine: Engine, celery_app: Celery, count: int) -> None:
    tasks = TaskOutbox(celery_app)
    with Session(engine) as session:
        for i in range(count):
            tasks.apply_async("orders.notify_customer", args=(i,), queue="nobody", session=session)
        session.commit()


def test_metrics_show_the_backlog_and_what_was_published(
    app: Flask, engine: Engine, celery_app: Celery
) -> None:
    """Backlog gauges come from the table; counters and the lag histogram from the relay."""
    enqueue(engine, celery_app, 3)
    client = app.test_client()
    before = client.get("/metrics").text
    assert 3 == metric(before, "celery_outbox_pending")
    assert 0 == metric(before, "celery_outbox_dead")
    published = ("celery_outbox_published_total", '{task="orders.notify_customer"}')
    published_before = metric(before, *published, default=0.0)
    lag_count_before = metric(before, "celery_outbox_dispatch_lag_seconds_count")

    assert 3 == Relay(engine, celery_app).drain().published
    after = client.get("/metrics").text
    assert 0 == metric(after, "celery_outbox_pending")
    assert published_before + 3 == metric(after, *published)
    assert lag_count_before + 3 == metric(after, "celery_outbox_dispatch_lag_seconds_count")
    assert 0 == metric(after, "celery_outbox_oldest_pending_age_seconds")


def test_healthz_is_ok_with_database_broker_a_relay_and_a_short_lag(
    app: Flask, engine: Engine, celery_app: Celery
) -> None:
    """All four checks pass once a relay has run: 200 and a JSON body saying so."""
    Relay(engine, celery_app).maintain()
    response = app.test_client().get("/healthz")
    assert 200 == response.status_code, response.json
    assert {
        "status": "ok",
        "database": "ok",
        "broker": "ok",
        "outbox": "ok",
        "relay": "ok",
    }.items() <= response.json.items()


def test_healthz_fails_when_the_outbox_lags(app: Flask, engine: Engine, celery_app: Celery) -> None:
    """A due row older than OUTBOX_HEALTH_MAX_LAG makes the check fail with a 503."""
    Relay(engine, celery_app).maintain()
    enqueue(engine, celery_app, 1)
    with engine.begin() as conn:
        an_hour_ago = datetime.now(UTC) - timedelta(hours=1)
        conn.execute(update(outbox_table).values(available_at=an_hour_ago))
    response = app.test_client().get("/healthz")
    assert 503 == response.status_code
    assert "failing" == response.json["status"]
    assert response.json["outbox"].startswith("the oldest due row has waited 3600")


def test_healthz_says_in_plain_words_when_no_relay_runs(app: Flask, engine: Engine) -> None:
    """Nothing pending and no relay: /healthz fails on the relay check and says what to do."""
    response = app.test_client().get("/healthz")
    assert 503 == response.status_code
    assert ("ok", "ok") == (response.json["database"], response.json["outbox"])
    assert response.json["relay"].startswith("no relay or sweep has run yet: start a Celery")
    with engine.begin() as conn:
        long_ago = datetime.now(UTC) - timedelta(minutes=5)
        conn.execute(
            insert(relays_table).values(name="sweep@gone", kind="sweep", last_seen_at=long_ago)
        )
    response = app.test_client().get("/healthz")
    assert response.json["relay"].startswith("no relay or sweep has run for 300s")


def test_healthz_reports_the_kind_of_a_failure_never_its_text(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An unreachable database and broker are reported as such, without exception text."""
    from webapp import create_app

    # Celery lets this variable override the broker an app is given.
    monkeypatch.delenv("CELERY_BROKER_URL")
    closed = f"127.0.0.1:{free_port()}"
    broken = create_app({"SQLALCHEMY_DATABASE_URI": f"postgresql+psycopg://u:secret@{closed}/x"})
    broker = Celery("down", broker=f"redis://:secret@{closed}/0", set_as_current=False)
    broker.conf.broker_transport_options = {"socket_connect_timeout": 1}
    broken.extensions["outbox"].celery_app = broker
    response = broken.test_client().get("/healthz")
    assert 503 == response.status_code
    assert {"status": "failing", "database": "unreachable", "broker": "unreachable"} == (
        response.json
    )
    assert "secret" not in response.text
