"""The relay publishes due rows under their stored task ids and marks them, in one transaction."""

from __future__ import annotations

import json
import logging
import threading
import uuid
from datetime import timedelta
from typing import Any

import pytest
from celery import Celery
from kombu.exceptions import OperationalError
from kombu.transport import memory
from sqlalchemy import Engine, create_engine, select
from sqlalchemy.orm import Session

from outbox import OutboxMessage, OutboxSettings, OutboxStatus, Relay, TaskOutbox
from outbox.maintenance.scheduler import MAINTENANCE_INTERVAL
from outbox.transports import OpaqueBrokerProbe
from tests.unit.conftest import FakeClock, count_rows, drain_queue


def _add(x: int, y: int) -> int:
    return x + y


def test_due_rows_are_published_with_the_enqueued_task_id(
    tasks: TaskOutbox, session: Session, relay: Relay, celery_app: Celery, clock: FakeClock
) -> None:
    """Each message carries the id returned at enqueue, the args and the kwargs."""
    result = tasks.apply_async("unit.echo", args=(1, "a"), kwargs={"k": [2]})
    session.commit()
    batch = relay.run_once()
    assert (1, 1) == (batch.claimed, batch.published)
    [message] = drain_queue(celery_app)
    assert result.id == message["headers"]["id"]
    assert "unit.echo" == message["headers"]["task"]
    assert [1, "a"] == message["body"][0]
    assert {"k": [2]} == message["body"][1]
    row = session.scalars(select(OutboxMessage)).one()
    session.refresh(row)
    assert OutboxStatus.DISPATCHED == row.status
    assert clock.now == row.dispatched_at
    assert (1, 0) == (row.deliveries, row.attempts), "one delivery, no failed attempt"


def test_dispatched_rows_are_not_published_again(
    tasks: TaskOutbox, session: Session, relay: Relay, celery_app: Celery
) -> None:
    """A second run finds nothing: marking happened in the publishing transaction."""
    tasks.delay("unit.add", 1, 2)
    session.commit()
    relay.run_once()
    assert 0 == relay.run_once().claimed
    assert 1 == len(drain_queue(celery_app))


def test_rows_wait_until_due(
    tasks: TaskOutbox, session: Session, relay: Relay, celery_app: Celery, clock: FakeClock
) -> None:
    """A countdown row is not published before available_at and is published after."""
    tasks.apply_async("unit.add", args=(1, 2), countdown=60)
    session.commit()
    clock.advance(59)
    assert 0 == relay.run_once().published
    clock.advance(1)
    assert 1 == relay.run_once().published
    [message] = drain_queue(celery_app)
    assert message["headers"]["eta"] is None, "the broker must not hold it as an ETA task"


def test_stored_options_reach_the_message(
    tasks: TaskOutbox, session: Session, relay: Relay, celery_app: Celery, clock: FakeClock
) -> None:
    """queue, priority, headers and the absolute expiry are applied at publish time."""
    tasks.apply_async(
        "unit.add",
        args=(1, 2),
        queue="mail",
        priority=3,
        headers={"tenant": "acme"},
        expires=600,
        time_limit=30,
        soft_time_limit=20,
    )
    session.commit()
    clock.advance(30)
    relay.run_once()
    assert [] == drain_queue(celery_app, "celery")
    [message] = drain_queue(celery_app, "mail")
    assert "acme" == message["headers"]["tenant"]
    assert 3 == message["properties"]["priority"]
    assert [30.0, 20.0] == message["headers"]["timelimit"]
    expected_expiry = clock.now - timedelta(seconds=30) + timedelta(seconds=600)
    assert expected_expiry.isoformat() == message["headers"]["expires"]


def test_batches_are_bounded_and_drain_empties_the_outbox(
    tasks: TaskOutbox, session: Session, relay: Relay, celery_app: Celery, engine: Engine
) -> None:
    """run_once takes at most batch_size rows; drain loops until none is due."""
    for i in range(25):
        tasks.delay("unit.add", i, i)
    session.commit()
    assert 10 == relay.run_once().published
    drained = relay.drain()
    assert (15, 2) == (drained.published, drained.batches)
    assert 25 == count_rows(engine, status=OutboxStatus.DISPATCHED)
    assert 25 == len({m["headers"]["id"] for m in drain_queue(celery_app)})


def test_a_row_failing_on_its_own_backs_off_then_dies(
    engine: Engine, celery_app: Celery, clock: FakeClock, session: Session
) -> None:
    """A task unknown to the relay is retried with backoff and dead after max_attempts."""
    TaskOutbox(celery_app, default_session=lambda: session, clock=clock).delay("unit.add", 1, 2)
    session.commit()
    # The relay's app no longer knows the task, e.g. a deploy removed it.
    relay_app = Celery("relay", broker="memory://", set_as_current=False)
    settings = OutboxSettings(max_attempts=3, retry_backoff=10, retry_backoff_max=15)
    relay = Relay(engine, relay_app, settings, clock=clock)

    assert 1 == relay.run_once().failed
    row = session.scalars(select(OutboxMessage)).one()
    assert (OutboxStatus.PENDING, 1) == (row.status, row.attempts)
    assert "'unit.add' is not registered" in (row.last_error or "")
    assert clock.now + timedelta(seconds=5) <= row.available_at <= clock.now + timedelta(seconds=10)
    assert 0 == relay.run_once().claimed, "backed-off row is not retried before its time"

    clock.advance(15)
    relay.run_once()
    clock.advance(15)
    final = relay.run_once()
    session.refresh(row)
    assert (1, OutboxStatus.DEAD, 3) == (final.dead, row.status, row.attempts)
    clock.advance(3600)
    assert 0 == relay.run_once().claimed, "dead rows are never claimed"


def test_healthy_rows_flow_past_a_failing_one(
    engine: Engine, celery_app: Celery, clock: FakeClock, session: Session
) -> None:
    """One row that cannot be published does not hold back the rest of its batch."""
    tasks = TaskOutbox(celery_app, default_session=lambda: session, clock=clock)
    tasks.delay("unit.add", 1, 2)
    tasks.delay("unit.echo", "x")
    tasks.delay("unit.add", 3, 4)
    session.commit()
    relay_app = Celery("relay", broker="memory://", set_as_current=False)
    relay_app.task(name="unit.add", shared=False)(_add)
    batch = Relay(engine, relay_app, clock=clock).run_once()
    assert (3, 2, 1) == (batch.claimed, batch.published, batch.failed)
    assert 2 == len(drain_queue(relay_app))


def test_unreachable_broker_leaves_rows_pending_and_uncounted(
    tasks: TaskOutbox, session: Session, engine: Engine, clock: FakeClock, celery_app: Celery
) -> None:
    """When nothing listens at the broker address the batch stops; no attempt is charged."""
    tasks.delay("unit.add", 1, 2)
    session.commit()
    down = Celery("down", broker="redis://127.0.0.1:9/0", set_as_current=False)
    down.conf.update(task_publish_retry=False, broker_connection_timeout=1)
    down.task(name="unit.add", shared=False)(_add)
    batch = Relay(engine, down, clock=clock).run_once()
    assert batch.broker_unavailable
    assert 0 == batch.published
    row = session.scalars(select(OutboxMessage)).one()
    assert (OutboxStatus.PENDING, 0, clock.now) == (row.status, row.attempts, row.available_at)


def test_rows_committed_out_of_id_order_are_all_published(
    engine: Engine, celery_app: Celery, clock: FakeClock, relay: Relay
) -> None:
    """Selection is by status, so a lower id committed later is still dispatched."""
    tasks = TaskOutbox(celery_app, clock=clock)
    with engine.connect() as conn:
        tasks.apply_async("unit.add", args=(1, 1), session=conn)
        conn.commit()
    assert 1 == relay.run_once().published
    # A row whose id is lower than one already dispatched would be skipped by a
    # high-water mark; simulate it by inserting with an explicit low id.
    with engine.begin() as conn:
        conn.execute(
            OutboxMessage.__table__.insert().values(
                id=0,
                task_id=uuid.uuid4(),
                task_name="unit.add",
                args=[2, 2],
                kwargs={},
                options={},
                status=OutboxStatus.PENDING,
                attempts=0,
                created_at=clock.now,
                available_at=clock.now,
            )
        )
    assert 1 == relay.run_once().published


class SwitchableBroker(OpaqueBrokerProbe):
    """The in-memory broker, made to refuse publishes (and pings) while ``down`` is set."""

    def __init__(self, celery_app: Celery, monkeypatch: pytest.MonkeyPatch) -> None:
        super().__init__(celery_app)
        self.down = False
        put = memory.Channel._put

        def put_unless_down(channel: Any, queue: str, message: Any, **kwargs: Any) -> None:
            if self.down:
                raise OperationalError("Connection refused")
            put(channel, queue, message, **kwargs)

        monkeypatch.setattr(memory.Channel, "_put", put_unless_down)

    def reachable(self) -> bool:
        return not self.down


def test_an_outage_is_logged_once_and_its_end_once(
    tasks: TaskOutbox,
    session: Session,
    engine: Engine,
    clock: FakeClock,
    celery_app: Celery,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Repeated runs during one outage log one warning, and recovery logs one more."""
    for i in range(3):
        tasks.delay("unit.add", i, i)
    session.commit()
    broker = SwitchableBroker(celery_app, monkeypatch)
    relay = Relay(engine, celery_app, clock=clock, probe=broker)
    broker.down = True
    with caplog.at_level(logging.WARNING, logger="outbox.relays.outcomes"):
        for _ in range(3):
            assert relay.run_once().broker_unavailable
        broker.down = False
        assert 3 == relay.run_once().published
    messages = [record.getMessage() for record in caplog.records]
    assert 2 == len(messages), messages
    assert messages[0].startswith("broker unavailable")
    assert messages[1].startswith("broker reachable again")


def test_concurrent_relays_on_sqlite_publish_each_row_once(
    tasks: TaskOutbox, session: Session, engine: Engine, celery_app: Celery, clock: FakeClock
) -> None:
    """Relays with their own connections to one SQLite file never claim the same row."""
    expected = {tasks.delay("unit.add", i, i).id for i in range(300)}
    session.commit()
    start = threading.Barrier(3)
    published: list[int] = []

    def run_relay() -> None:
        own_engine = create_engine(engine.url, connect_args={"timeout": 30})
        relay = Relay(own_engine, celery_app, OutboxSettings(batch_size=7), clock=clock)
        start.wait()
        published.append(relay.drain(max_seconds=60).published)
        own_engine.dispose()

    threads = [threading.Thread(target=run_relay) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    ids = [message["headers"]["id"] for message in drain_queue(celery_app)]
    assert 300 == sum(published)
    assert 300 == len(ids)
    assert expected == set(ids)


def test_drain_stops_between_batches_when_asked(
    tasks: TaskOutbox, session: Session, relay: Relay
) -> None:
    """A stop request ends the drain after the batch in hand, leaving the rest pending."""
    for i in range(25):
        tasks.delay("unit.add", i, i)
    session.commit()
    drained = relay.drain(stop=lambda: True)
    assert (1, 10) == (drained.batches, drained.published)


def test_a_broker_failure_mid_batch_marks_the_messages_already_out(
    tasks: TaskOutbox,
    session: Session,
    engine: Engine,
    celery_app: Celery,
    clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A transport that publishes at once (the in-memory one, like AMQP): the rows whose
    publish returned are on the broker and are marked; the rest stay pending, uncharged."""
    ids = [tasks.apply_async("unit.add", args=(i, 1)).id for i in range(5)]
    session.commit()
    broker = SwitchableBroker(celery_app, monkeypatch)
    relay = Relay(engine, celery_app, clock=clock, probe=broker)
    put = memory.Channel._put
    calls = 0

    def fail_from_the_fourth(channel: Any, queue: str, message: Any, **kwargs: Any) -> None:
        nonlocal calls
        calls += 1
        broker.down = calls >= 4
        put(channel, queue, message, **kwargs)

    monkeypatch.setattr(memory.Channel, "_put", fail_from_the_fourth)
    batch = relay.run_once()
    assert (batch.claimed, batch.published, batch.failed) == (5, 3, 0)
    assert batch.broker_unavailable
    assert ids[:3] == [m["headers"]["id"] for m in drain_queue(celery_app)]
    rows = {str(row.task_id): row for row in session.scalars(select(OutboxMessage)).all()}
    for row in rows.values():
        session.refresh(row)
    assert [OutboxStatus.DISPATCHED] * 3 + [OutboxStatus.PENDING] * 2 == [
        rows[task_id].status for task_id in ids
    ]
    assert [0] * 5 == [rows[task_id].attempts for task_id in ids], "no row was charged"


def test_a_connection_error_while_the_broker_answers_is_the_rows(
    tasks: TaskOutbox,
    session: Session,
    relay: Relay,
    celery_app: Celery,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An error the transport lists as a connection error, raised while a fresh connection
    to the broker works, is charged to its row; the rest of the batch is published."""
    ids = [tasks.apply_async("unit.add", args=(i, 1)).id for i in range(5)]
    session.commit()
    put = memory.Channel._put

    def refuse_the_fourth(channel: Any, queue: str, message: Any, **kwargs: Any) -> None:
        if '"unit.add"' in json.dumps(message) and "[3, 1]" in json.dumps(message):
            raise OperationalError("this message cannot be routed")
        put(channel, queue, message, **kwargs)

    monkeypatch.setattr(memory.Channel, "_put", refuse_the_fourth)
    batch = relay.run_once()
    assert (5, 4, 1, False) == (
        batch.claimed,
        batch.published,
        batch.failed,
        batch.broker_unavailable,
    )
    rows = {str(row.task_id): row for row in session.scalars(select(OutboxMessage)).all()}
    for row in rows.values():
        session.refresh(row)
    assert [0, 0, 0, 1, 0] == [rows[task_id].attempts for task_id in ids]
    assert OutboxStatus.PENDING == rows[ids[3]].status
    assert "OperationalError: this message cannot be routed" == rows[ids[3]].last_error


def test_a_draining_relay_maintains_at_most_every_few_seconds(
    relay: Relay, clock: FakeClock
) -> None:
    """Heartbeat and confirmation checks run with a drain only when MAINTENANCE_INTERVAL
    has passed by the relay's clock, however often it drains."""
    assert relay.drain().confirmation is not None, "a new relay maintains at once"
    clock.advance(MAINTENANCE_INTERVAL - 0.1)
    assert relay.drain().confirmation is None
    assert relay.drain(maintain=False).confirmation is None
    clock.advance(0.1)
    assert relay.drain().confirmation is not None


def test_a_drain_ends_when_its_time_is_up(
    tasks: TaskOutbox, session: Session, relay: Relay
) -> None:
    """A drain with rows left stops after the batch in hand once max_seconds is spent."""
    for i in range(25):
        tasks.delay("unit.add", i, i)
    session.commit()
    drained = relay.drain(max_seconds=1e-9)
    assert (1, 10) == (drained.batches, drained.published)
