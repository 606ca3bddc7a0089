"""The health judgement of the CDC relay's slot, and how often ``/healthz`` checks."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery import Celery
from flask import Flask
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import event

from outbox import create_tables
from outbox.contrib.flask import Outbox
from outbox.contrib.monitoring import CACHE_SECONDS_KEY, monitoring_blueprint
from outbox.maintenance.heartbeat import RelayRun
from outbox.observability.health import DEFAULT_CACHE_SECONDS, assess
from outbox.observability.stats import OutboxStats
from outbox.postgres.slot import SlotState
from tests.unit.conftest import FakeClock


def stats_with(slot: SlotState | None, cdc_seen: float | None = None) -> OutboxStats:
    relays = [RelayRun("sweep@host", "sweep", 1.0)]
    if cdc_seen is not None:
        relays.append(RelayRun("cdc@host", "cdc", cdc_seen))
    return OutboxStats(
        pending=0, due=0, dead=0, oldest_pending_age_seconds=None,
        last_relay_run_seconds_ago=1.0, relays=relays, cdc_slot=slot,
    )  # fmt: skip


IDLE = SlotState("celery_outbox", exists=True, active=False, lag_bytes=10**9)


@pytest.mark.parametrize(
    ("slot", "cdc_seen", "problem"),
    [
        (None, None, None),
        (SlotState("celery_outbox", exists=True, active=True, lag_seconds=0.0), 1.0, None),
        (IDLE, 5.0, None),
        (IDLE, 61.0, "no CDC relay has streamed from replication slot celery_outbox for 61s"),
        (IDLE, None, "has streamed from replication slot celery_outbox ever, and it keeps"),
        (
            SlotState("celery_outbox", exists=True, active=True, lag_seconds=61, lag_bytes=2048),
            1.0,
            "slot celery_outbox is 61s behind (limit 60s), keeping 2,048 bytes of WAL",
        ),
        (
            SlotState("celery_outbox", exists=True, wal_status="lost"),
            1.0,
            "slot celery_outbox is invalidated: polling publishes everything; drop it",
        ),
    ],
    ids=["no slot", "caught up", "taking over", "abandoned", "never read", "behind", "invalidated"],
)
def test_the_slot_fails_health_when_invalidated_behind_or_abandoned(
    slot: SlotState | None, cdc_seen: float | None, problem: str | None
) -> None:
    """A slot between a relay's death and its standby's take-over is fine; one nobody
    reads for longer than the lag limit keeps WAL for nothing."""
    health = assess(stats_with(slot, cdc_seen), max_lag=60)
    if problem is None:
        assert health.cdc is None
        assert health.ok
    else:
        assert health.cdc is not None
        assert problem in health.cdc
        assert "CDC SLOT" == health.headline
        assert [health.cdc] == health.problems


class CountingProbe:
    """A broker probe that counts its checks; the first waits for ``release``."""

    def __init__(self) -> None:
        self.checks = 0
        self.release = threading.Event()
        self.release.set()

    def reachable(self) -> bool:
        self.checks += 1
        self.release.wait(timeout=10)
        return True


@pytest.fixture
def health_app(tmp_path: Path, celery_app: Celery, clock: FakeClock) -> Iterator[Flask]:
    """A Flask app with the outbox on a SQLite file, ``/healthz`` on ``clock``, and a
    counting probe for a broker."""
    app = Flask("health")
    app.config["SQLALCHEMY_DATABASE_URI"] = f"sqlite:///{tmp_path / 'health.sqlite3'}"
    db = SQLAlchemy()
    db.init_app(app)
    Outbox(app, db, celery=celery_app)
    app.register_blueprint(monitoring_blueprint(clock=clock))
    app.extensions["outbox"]._probe = CountingProbe()
    with app.app_context():
        create_tables(db.engine)
    yield app
    with app.app_context():
        db.engine.dispose()


def statements(app: Flask) -> list[str]:
    """Every statement the app's engine sends from now on."""
    sent: list[str] = []
    with app.app_context():
        engine = app.extensions["outbox"].db.engine
    event.listen(engine, "before_cursor_execute", lambda *args: sent.append(args[2]))
    return sent


def test_healthz_checks_once_per_interval_however_many_ask(
    health_app: Flask, clock: FakeClock
) -> None:
    """Requests within OUTBOX_HEALTH_CACHE_SECONDS get the last answer: one broker probe
    and one round of queries; the first request after it checks again."""
    probe = health_app.extensions["outbox"].probe
    sent = statements(health_app)
    client = health_app.test_client()
    answers = [client.get("/healthz") for _ in range(20)]
    assert 1 == probe.checks
    queries = len(sent)
    assert queries > 0
    assert {(503, "failing")} == {(a.status_code, a.json["status"]) for a in answers}
    clock.advance(DEFAULT_CACHE_SECONDS - 0.001)
    client.get("/healthz")
    assert (1, queries) == (probe.checks, len(sent))
    clock.advance(0.001)
    client.get("/healthz")
    assert (2, 2 * queries) == (probe.checks, len(sent))


def test_healthz_checks_once_for_requests_that_arrive_together(health_app: Flask) -> None:
    """Requests arriving while a check runs wait for its answer instead of each
    starting one: a flood costs one check."""
    probe = health_app.extensions["outbox"].probe
    probe.release.clear()
    count = 8
    arrived = threading.Semaphore(0)
    health_app.before_request(arrived.release)
    statuses: list[int] = []

    def ask() -> None:
        statuses.append(health_app.test_client().get("/healthz").status_code)

    threads = [threading.Thread(target=ask) for _ in range(count)]
    for thread in threads:
        thread.start()
    for _ in range(count):
        assert arrived.acquire(timeout=10), "every request reached the app"
    probe.release.set()
    for thread in threads:
        thread.join(timeout=10)
    assert [503] * count == statuses
    assert 1 == probe.checks


def test_a_cache_of_zero_seconds_checks_every_request(health_app: Flask) -> None:
    """OUTBOX_HEALTH_CACHE_SECONDS = 0 turns the cache off."""
    health_app.config[CACHE_SECONDS_KEY] = 0
    client = health_app.test_client()
    for _ in range(3):
        client.get("/healthz")
    assert 3 == health_app.extensions["outbox"].probe.checks


def test_a_clock_set_back_does_not_keep_an_answer(health_app: Flask, clock: FakeClock) -> None:
    """An answer from the future (the wall clock set back since) is not given again."""
    client = health_app.test_client()
    client.get("/healthz")
    clock.advance(-3600)
    client.get("/healthz")
    assert 2 == health_app.extensions["outbox"].probe.checks
