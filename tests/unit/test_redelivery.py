"""Dispatched tasks that no idempotent consumer confirms in time are published again."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from celery import Celery
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, scoped_session, sessionmaker

from outbox import (
    OutboxMessage,
    OutboxSettings,
    OutboxStatus,
    ProcessedMessage,
    Relay,
    TaskOutbox,
    idempotent,
)
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
    settings = OutboxSettings(confirm_timeout=TIMEOUT, max_attempts=3)
    return Relay(engine, celery_app, settings, clock=clock)


def the_row(session: Session) -> OutboxMessage:
    session.expire_all()
    return session.scalars(select(OutboxMessage)).one()


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
    assert 0 == relay.redeliver_unconfirmed(), "not before the deadline"
    clock.advance(1)
    assert 1 == relay.redeliver_unconfirmed()
    row = the_row(session)
    assert (OutboxStatus.PENDING, clock.now) == (row.status, row.available_at)
    assert "no consumer recorded this task as processed within 60s" in (row.last_error or "")
    assert 1 == relay.run_once().published
    assert (OutboxStatus.DISPATCHED, 2) == (the_row(session).status, the_row(session).attempts)
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
    db.add(ProcessedMessage(task_id=result.id, task_name="unit.confirming", processed_at=clock.now))
    db.commit()
    clock.advance(TIMEOUT)
    assert 0 == relay.redeliver_unconfirmed()
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
    assert 0 == relay.redeliver_unconfirmed()


def test_a_task_never_confirmed_dies_after_max_attempts(
    tasks: TaskOutbox, session: Session, relay: Relay, confirming: Any, clock: FakeClock
) -> None:
    """Republishing is bounded: after max_attempts publishes the row is dead, with the reason."""
    tasks.delay(confirming, 1)
    session.commit()
    for _ in range(3):
        relay.drain()
        clock.advance(TIMEOUT)
    relay.drain()
    row = the_row(session)
    assert (OutboxStatus.DEAD, 3) == (row.status, row.attempts)
    assert "within 60s of dispatch" in (row.last_error or "")


def test_an_expired_task_is_not_published_again(
    tasks: TaskOutbox, session: Session, relay: Relay, confirming: Any, clock: FakeClock
) -> None:
    """A worker discards an expired task unrun: waiting for its confirmation is pointless."""
    tasks.apply_async(confirming, args=(1,), expires=30)
    session.commit()
    relay.run_once()
    clock.advance(TIMEOUT)
    assert 0 == relay.redeliver_unconfirmed()
    row = the_row(session)
    assert (OutboxStatus.DISPATCHED, None) == (row.status, row.confirm_deadline)
    assert "expired before any consumer ran it" == row.last_error
