"""Dispatched tasks no idempotent consumer confirms are published again, by the rules of
``outbox.maintenance.confirmation``: from their last sign of life, a bounded number of times, in
bounded batches. (On the in-memory broker, which cannot say what it holds: time-outs.)"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest
from celery import Celery
from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session, scoped_session, sessionmaker

from outbox import (
    OutboxMessage,
    OutboxSettings,
    OutboxStatus,
    ProcessedMessage,
    Relay,
    TaskOutbox,
    idempotent,
    outbox_table,
)
from outbox.maintenance import confirmation as confirmation_module
from outbox.transports import BrokerState, OpaqueBrokerProbe
from tests.unit.conftest import FakeClock, drain_queue

TIMEOUT = 60


@pytest.fixture
def db(engine: Engine) -> Iterator[scoped_session[Session]]:
    session = scoped_session(sessionmaker(engine))
    yield session
    session.remove()


@pytest.fixture
def confirming(celery_app: Celery, db: scoped_session[Session]) -> Any:
    @celery_app.task(name="unit.confirming", bind=True, shared=False)
    @idempotent(lambda: db)
    def confirming(self: Any, n: int) -> int:
        return n

    return confirming


@pytest.fixture
def relay(engine: Engine, celery_app: Celery, clock: FakeClock) -> Relay:
    settings = OutboxSettings(confirm_timeout=TIMEOUT, max_deliveries=3)
    return Relay(engine, celery_app, settings, clock=clock)


def the_row(session: Session) -> OutboxMessage:
    session.expire_all()
    return session.scalars(select(OutboxMessage)).one()


def record_processed(db: scoped_session[Session], task_id: str, clock: FakeClock) -> None:
    db.add(ProcessedMessage(task_id=task_id, task_name="unit.confirming", processed_at=clock.now))
    db.commit()


def test_unconfirmed_task_is_published_again_under_the_same_id(
    tasks: TaskOutbox,
    session: Session,
    relay: Relay,
    confirming: Any,
    celery_app: Celery,
    clock: FakeClock,
) -> None:
    """No processed record by the deadline: the row goes back to pending and is republished."""
    result = tasks.delay(confirming, 1)
    session.commit()
    relay.run_once()
    assert clock.now + timedelta(seconds=TIMEOUT) == the_row(session).confirm_deadline

    clock.advance(TIMEOUT - 1)
    assert 0 == relay.confirmation.run_once().republished, "not before the deadline"
    clock.advance(1)
    assert 1 == relay.confirmation.run_once().republished
    row = the_row(session)
    assert (OutboxStatus.PENDING, clock.now) == (row.status, row.available_at)
    assert "no consumer recorded this task as processed within 60s" in (row.last_error or "")
    assert 1 == relay.run_once().published
    row = the_row(session)
    assert (OutboxStatus.DISPATCHED, 2, 0) == (row.status, row.deliveries, row.attempts)
    assert [result.id, result.id] == [m["headers"]["id"] for m in drain_queue(celery_app)]


def test_confirmed_task_is_left_alone(
    tasks: TaskOutbox,
    session: Session,
    relay: Relay,
    confirming: Any,
    db: scoped_session[Session],
    clock: FakeClock,
) -> None:
    """A processed record (the consumer ran) clears the deadline; nothing is republished."""
    result = tasks.delay(confirming, 1)
    session.commit()
    relay.run_once()
    record_processed(db, result.id, clock)
    clock.advance(TIMEOUT)
    outcome = relay.confirmation.run_once()
    assert (1, 0) == (outcome.confirmed, outcome.republished)
    row = the_row(session)
    assert (OutboxStatus.DISPATCHED, None) == (row.status, row.confirm_deadline)


def test_tasks_without_an_idempotent_consumer_are_never_redelivered(
    tasks: TaskOutbox, session: Session, relay: Relay, clock: FakeClock
) -> None:
    """Only consumers that record processed ids can confirm, so only they get a deadline."""
    tasks.delay("unit.add", 1, 2)
    session.commit()
    relay.run_once()
    assert the_row(session).confirm_deadline is None
    clock.advance(10 * TIMEOUT)
    assert 0 == relay.confirmation.run_once().republished


def test_a_task_never_confirmed_dies_after_max_deliveries_without_charging_attempts(
    tasks: TaskOutbox, session: Session, relay: Relay, confirming: Any, clock: FakeClock
) -> None:
    """Republishing is bounded by deliveries, counted apart from failed publish attempts."""
    tasks.delay(confirming, 1)
    session.commit()
    for _ in range(3):
        relay.run_once()
        clock.advance(TIMEOUT)
        relay.confirmation.run_once()
    row = the_row(session)
    assert (OutboxStatus.DEAD, 3, 0) == (row.status, row.deliveries, row.attempts)
    assert "dead after 3 deliveries" in (row.last_error or "")


def test_a_row_dead_for_lack_of_confirmation_comes_back_when_its_record_appears(
    tasks: TaskOutbox,
    session: Session,
    relay: Relay,
    confirming: Any,
    db: scoped_session[Session],
    clock: FakeClock,
) -> None:
    """The consumer did run after all (its record is late): the row is dispatched, not dead."""
    result = tasks.delay(confirming, 1)
    session.commit()
    for _ in range(3):
        relay.run_once()
        clock.advance(TIMEOUT)
        relay.confirmation.run_once()
    assert OutboxStatus.DEAD == the_row(session).status
    record_processed(db, result.id, clock)
    assert 1 == relay.confirmation.run_once().revived
    row = the_row(session)
    assert (OutboxStatus.DISPATCHED, None) == (row.status, row.confirm_deadline)
    assert "confirmed by its consumer after it was marked dead" == row.last_error


def test_an_expired_task_is_not_published_again(
    tasks: TaskOutbox, session: Session, relay: Relay, confirming: Any, clock: FakeClock
) -> None:
    """A worker discards an expired task unrun: waiting for its confirmation is pointless."""
    tasks.apply_async(confirming, args=(1,), expires=30)
    session.commit()
    relay.run_once()
    clock.advance(TIMEOUT)
    outcome = relay.confirmation.run_once()
    assert (1, 0) == (outcome.expired, outcome.republished)
    row = the_row(session)
    assert (OutboxStatus.DISPATCHED, None) == (row.status, row.confirm_deadline)
    assert "expired before any consumer ran it" == row.last_error


def test_the_deadline_counts_from_the_tasks_last_sign_of_life(
    tasks: TaskOutbox,
    session: Session,
    engine: Engine,
    relay: Relay,
    confirming: Any,
    clock: FakeClock,
) -> None:
    """A task a worker started 50 s after its dispatch has until then plus the timeout."""
    tasks.delay(confirming, 1)
    session.commit()
    relay.run_once()
    dispatched_at = clock.now
    with engine.begin() as conn:  # what lifecycle tracking records when the run starts
        started = dispatched_at + timedelta(seconds=50)
        conn.execute(update(outbox_table).values(task_started_at=started, task_state="STARTED"))
    clock.advance(TIMEOUT)
    outcome = relay.confirmation.run_once()
    assert (1, 0) == (outcome.extended, outcome.republished)
    assert started + timedelta(seconds=TIMEOUT) == the_row(session).confirm_deadline
    clock.advance(50)
    assert 1 == relay.confirmation.run_once().republished


def test_a_retry_with_a_long_countdown_is_not_published_again_before_it_is_due(
    tasks: TaskOutbox,
    session: Session,
    engine: Engine,
    relay: Relay,
    confirming: Any,
    clock: FakeClock,
) -> None:
    """self.retry(countdown=600) with a 60 s timeout: the task is alive until its retry is due."""
    tasks.delay(confirming, 1)
    session.commit()
    relay.run_once()
    with engine.begin() as conn:  # what lifecycle tracking records for a retried run
        conn.execute(
            update(outbox_table).values(
                task_state="RETRY",
                task_started_at=clock.now,
                task_finished_at=clock.now + timedelta(seconds=1),
                task_retry_eta=clock.now + timedelta(seconds=601),
            )
        )
    for _ in range(11):
        clock.advance(TIMEOUT)
        assert 0 == relay.confirmation.run_once().republished, clock.now
    clock.advance(TIMEOUT)
    assert 1 == relay.confirmation.run_once().republished


def test_overdue_rows_are_put_back_in_bounded_batches(
    engine: Engine,
    celery_app: Celery,
    session: Session,
    relay: Relay,
    confirming: Any,
    clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """After an outage longer than the timeout, each run works off a bounded number of rows."""
    monkeypatch.setattr(confirmation_module, "BATCH_ROWS", 4)
    monkeypatch.setattr(confirmation_module, "MAX_BATCHES_PER_RUN", 2)
    outbox = TaskOutbox(celery_app, default_session=lambda: session, clock=clock)
    for n in range(19):
        outbox.delay(confirming, n)
    session.commit()
    relay.drain()
    clock.advance(TIMEOUT)
    assert [8, 8, 3, 0] == [relay.confirmation.run_once().republished for _ in range(4)]


class StubBroker(OpaqueBrokerProbe):
    """A broker that reports the identity a test gives it (the Redis probe reads it from
    INFO and a marker key; tests/chaos restarts a real one)."""

    def __init__(self, celery_app: Celery, clock: FakeClock) -> None:
        super().__init__(celery_app, clock=clock)
        self.identity = BrokerState("redis://stub:6379/0", "marker-1", "run-1", clock.now)
        self.name = self.identity.broker

    def state(
        self, known_marker: str | None = None, known_run_id: str | None = None
    ) -> BrokerState:
        return self.identity

    def restart(self, at: datetime, *, keeps_data: bool = False) -> None:
        marker = self.identity.data_marker if keeps_data else uuid.uuid4().hex
        self.identity = BrokerState(self.identity.broker, marker, uuid.uuid4().hex, at)


@pytest.fixture
def broker(celery_app: Celery, clock: FakeClock) -> StubBroker:
    return StubBroker(celery_app, clock)


def test_a_broker_that_lost_its_data_gets_back_what_was_dispatched_before(
    engine: Engine,
    celery_app: Celery,
    session: Session,
    confirming: Any,
    clock: FakeClock,
    broker: StubBroker,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Marker gone, new instance: the unconfirmed tasks dispatched before its start are
    put back (in batches), those dispatched after it are not; a restart that kept its
    data republishes nothing."""
    monkeypatch.setattr(confirmation_module, "BATCH_ROWS", 2)
    relay = Relay(engine, celery_app, OutboxSettings(), clock=clock, probe=broker)
    outbox = TaskOutbox(celery_app, default_session=lambda: session, clock=clock)
    before = [outbox.delay(confirming, n).id for n in range(5)]
    session.commit()
    relay.drain(maintain=False)
    first = relay.maintain()
    assert (0, False) == (first.republished, first.broker_data_lost), "first sight: remembered"

    clock.advance(30)
    broker.restart(clock.now, keeps_data=True)
    assert 0 == relay.confirmation.run_once().republished, "the data survived"

    clock.advance(30)
    broker.restart(clock.now)
    clock.advance(10)
    after = outbox.delay(confirming, 99).id
    session.commit()
    relay.drain(maintain=False)
    result = relay.confirmation.run_once()
    assert (5, True) == (result.republished, result.broker_data_lost)
    rows = {str(row.task_id): row for row in session.scalars(select(OutboxMessage))}
    for row in rows.values():
        session.refresh(row)
    assert {OutboxStatus.PENDING} == {rows[task_id].status for task_id in before}
    assert OutboxStatus.DISPATCHED == rows[after].status
    assert "the broker lost its data" in (rows[before[0]].last_error or "")
    assert 0 == relay.confirmation.run_once().republished, "once is enough"


def test_a_flushed_broker_gets_back_everything_unconfirmed(
    engine: Engine,
    celery_app: Celery,
    tasks: TaskOutbox,
    session: Session,
    confirming: Any,
    clock: FakeClock,
    broker: StubBroker,
) -> None:
    """Same instance, marker gone (FLUSHALL, an empty replica promoted): the moment of the
    loss is unknown, so every unconfirmed dispatched task is published again."""
    relay = Relay(engine, celery_app, OutboxSettings(), clock=clock, probe=broker)
    tasks.delay(confirming, 1)
    session.commit()
    relay.drain()
    clock.advance(3600 * 0.5)
    broker.identity = BrokerState(broker.identity.broker, "new", broker.identity.run_id, None)
    assert 1 == relay.confirmation.run_once().republished
