"""Publisher confirms on the machine's RabbitMQ, in this run's virtual host.

Only what the broker acknowledged is marked dispatched: an unroutable message is the
row's fault, a refused one (``basic.nack``), an unconfirmed batch or a closed connection
leave the rows pending, uncharged, to go out again under the same task ids.
"""

from __future__ import annotations

import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from celery import Celery, signals
from kombu import Queue
from kombu.simple import SimpleQueue
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from outbox import OutboxSettings, OutboxStatus, Relay, TaskOutbox, outbox_table
from outbox.maintenance.confirmation import ABSENT_TWICE_GAP, LOST_AFTER
from outbox.transports.amqp import ConfirmingPublisher
from tasks.orders import notify_customer, reserve_stock
from tests.chaos.redis_server import free_port
from tests.rabbitmq import (
    clear_policy,
    close_connection,
    connections,
    delete_queue,
    rabbitmqctl,
    set_queue_policy,
)
from tests.services import app_on

_t = outbox_table.c


#: A task routed to an exchange nobody bound a queue to: a route that leads nowhere.
UNROUTED = "confirms.unrouted"


def unrouted(order_id: int) -> None:
    """Never runs: its messages have no queue to go to."""


@pytest.fixture
def amqp_app(rabbitmq_url: str) -> Iterator[Celery]:
    queue = f"confirms-{uuid.uuid4().hex}"
    app = app_on(
        rabbitmq_url,
        "confirms",
        task_default_queue=queue,
        task_queues=None,
        task_routes={UNROUTED: {"exchange": "amq.topic", "routing_key": "nobody.home"}},
    )
    app.task(name=UNROUTED)(unrouted)
    yield app
    with app.connection_for_write() as conn:
        Queue(queue, channel=conn.default_channel).delete()


def enqueue(
    engine: Engine, app: Celery, count: int, task: str = notify_customer.name, **options: Any
) -> list[str]:
    outbox = TaskOutbox(app)
    with Session(engine) as session:
        ids = [
            outbox.apply_async(app.tasks[task], args=(i,), session=session, **options).id
            for i in range(count)
        ]
        session.commit()
    return ids


def rows(engine: Engine, ids: list[str]) -> dict[str, tuple[OutboxStatus, int]]:
    with engine.connect() as conn:
        found = conn.execute(
            select(_t.task_id, _t.status, _t.attempts).where(
                _t.task_id.in_([uuid.UUID(i) for i in ids])
            )
        ).all()
    return {str(task_id): (status, attempts) for task_id, status, attempts in found}


def drain_queue(app: Celery, queue: str) -> list[str]:
    """Every task id waiting in ``queue``, taking the messages."""
    ids = []
    with app.connection_for_read() as conn:
        simple = SimpleQueue(conn.default_channel, queue)
        try:
            while True:
                try:
                    message = simple.get(timeout=1)
                except simple.Empty:
                    return ids
                ids.append(message.headers["id"])
                message.ack()
        finally:
            simple.close()


def test_the_relay_on_rabbitmq_publishes_on_a_confirm_channel(
    engine: Engine, amqp_app: Celery
) -> None:
    ids = enqueue(engine, amqp_app, 250)
    with Relay(engine, amqp_app, OutboxSettings(batch_size=100)) as relay:
        assert isinstance(relay.publisher, ConfirmingPublisher)
        result = relay.drain()
    assert (250, 0, False) == (result.published, result.failed, result.broker_unavailable)
    assert {(OutboxStatus.DISPATCHED, 0)} == set(rows(engine, ids).values())
    assert sorted(ids) == sorted(drain_queue(amqp_app, amqp_app.conf.task_default_queue))


def test_an_unroutable_message_is_the_row_s_failure_and_the_rest_goes_out(
    engine: Engine, amqp_app: Celery
) -> None:
    """The task's route names an exchange no queue is bound to: RabbitMQ returns the
    mandatory message, and only that row is charged."""
    good = enqueue(engine, amqp_app, 3)
    lost_route = enqueue(engine, amqp_app, 1, task=UNROUTED)
    with Relay(engine, amqp_app) as relay:
        result = relay.run_once()
    assert (3, 1, False) == (result.published, result.failed, result.broker_unavailable)
    found = rows(engine, good + lost_route)
    assert {(OutboxStatus.DISPATCHED, 0)} == {found[i] for i in good}
    assert (OutboxStatus.PENDING, 1) == found[lost_route[0]]
    with engine.connect() as conn:
        error = conn.execute(
            select(_t.last_error).where(_t.task_id == uuid.UUID(lost_route[0]))
        ).scalar_one()
    assert "could not route" in error


def test_messages_the_broker_refuses_stay_pending_uncharged(
    engine: Engine, amqp_app: Celery, rabbitmq_vhost: str
) -> None:
    """A queue at its length limit that rejects publishes nacks them: the rows were not
    taken, through no fault of theirs."""
    full = f"full-{uuid.uuid4().hex}"
    set_queue_policy(
        rabbitmq_vhost, full, f"^{full}$", {"max-length": 0, "overflow": "reject-publish"}
    )
    try:
        refused = enqueue(engine, amqp_app, 2, queue=full)
        with Relay(engine, amqp_app) as relay:
            result = relay.run_once()
    finally:
        clear_policy(rabbitmq_vhost, full)
        with amqp_app.connection_for_write() as conn:
            Queue(full, channel=conn.default_channel).delete()
    assert (0, 0, True) == (result.published, result.failed, result.broker_unavailable)
    assert {(OutboxStatus.PENDING, 0)} == set(rows(engine, refused).values())


def test_a_batch_the_broker_does_not_confirm_in_time_stays_pending(
    engine: Engine, amqp_app: Celery, request: pytest.FixtureRequest
) -> None:
    """A memory alarm blocks every publisher on the node: nothing is confirmed, and
    after ``publish_confirm_timeout`` the batch ends as the broker's failure."""
    ids = enqueue(engine, amqp_app, 5)
    relay = Relay(engine, amqp_app, OutboxSettings(publish_confirm_timeout=1.0))
    request.addfinalizer(relay.close)
    relay.publisher.publish([])  # connected before the alarm, as a running relay is
    rabbitmqctl("set_vm_memory_high_watermark", "0.000001")
    try:
        result = relay.run_once()
    finally:
        rabbitmqctl("set_vm_memory_high_watermark", "0.4")
    assert (0, True) == (result.published, result.broker_unavailable)
    assert {(OutboxStatus.PENDING, 0)} == set(rows(engine, ids).values())
    # The connection that waited in vain is dropped: the next batch connects afresh.
    assert relay.publisher._link is None
    # Once the alarm clears, the same rows go out under the same ids.
    assert 5 == relay.drain().published
    assert sorted(ids) == sorted(set(drain_queue(amqp_app, amqp_app.conf.task_default_queue)))


def test_a_connection_closed_mid_batch_loses_nothing(
    engine: Engine, amqp_app: Celery, rabbitmq_vhost: str, request: pytest.FixtureRequest
) -> None:
    """RabbitMQ closes the relay's connection while a batch of 200 is on its way: what
    was acked is dispatched, the rest stays pending and goes out on a new connection.
    Nothing is lost; a message the broker took whose ack went down with the connection
    arrives twice (its consumer skips the second), and the test reports how many."""
    count = 600
    ids = enqueue(engine, amqp_app, count)
    relay = Relay(engine, amqp_app, OutboxSettings(batch_size=200))
    request.addfinalizer(relay.close)
    relay.publisher.publish([])
    # The test closes this very connection, from the broker's side.
    link = relay.publisher._link
    assert link is not None
    port = link.connection.connection.sock.getsockname()[1]
    [pid] = [c["pid"] for c in connections(rabbitmq_vhost) if int(c["peer_port"]) == port]

    published = 0
    closed = threading.Event()

    def close_at_the_hundredth(**_: Any) -> None:
        nonlocal published
        published += 1
        if published == 100 and not closed.is_set():
            close_connection(pid, "closed by the test, mid-batch")
            closed.set()

    signals.before_task_publish.connect(close_at_the_hundredth, weak=False)
    try:
        first = relay.run_once()
    finally:
        signals.before_task_publish.disconnect(close_at_the_hundredth)
    assert closed.is_set()
    assert first.broker_unavailable
    assert first.published < 200
    result = relay.drain()
    assert first.published + result.published == count
    with engine.connect() as conn:
        statuses = dict(conn.execute(select(_t.status, func.count()).group_by(_t.status)).all())
    assert {OutboxStatus.DISPATCHED: count} == statuses
    delivered = Counter(drain_queue(amqp_app, amqp_app.conf.task_default_queue))
    assert set(ids) == set(delivered), "every row's task reached the queue"
    duplicates = sum(n - 1 for n in delivered.values())
    print(f"closed mid-batch: {first.published} acked before the close, {duplicates} duplicates")


def test_an_unreachable_broker_charges_nothing(engine: Engine, amqp_app: Celery) -> None:
    down = app_on(f"amqp://guest:guest@127.0.0.1:{free_port()}//", "down")
    down.conf.broker_connection_timeout = 1
    ids = enqueue(engine, amqp_app, 3)
    with Relay(engine, down) as relay:
        result = relay.run_once()
    assert (0, 0, True) == (result.published, result.failed, result.broker_unavailable)
    assert {(OutboxStatus.PENDING, 0)} == set(rows(engine, ids).values())


class Clock:
    """A clock the test moves: the confirmation checks' waits pass at once."""

    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def deliveries(engine: Engine, ids: list[str]) -> dict[str, tuple[OutboxStatus, int, int]]:
    with engine.connect() as conn:
        found = conn.execute(
            select(_t.task_id, _t.status, _t.deliveries, _t.attempts).where(
                _t.task_id.in_([uuid.UUID(i) for i in ids])
            )
        ).all()
    return {str(row.task_id): (row.status, row.deliveries, row.attempts) for row in found}


def test_a_queue_deleted_behind_the_relay_is_declared_again_and_its_tasks_sent_again(
    engine: Engine, amqp_app: Celery, rabbitmq_vhost: str
) -> None:
    """The relay's connection had declared the queue, so it publishes without declaring
    it again and the broker returns the message: the queue was deleted. The row is not
    charged, the queue is declared with the next batch, and the unconfirmed tasks the
    queue held are published again under their ids."""
    queue = amqp_app.conf.task_default_queue
    held = enqueue(engine, amqp_app, 2, task=reserve_stock.name)
    with Relay(engine, amqp_app) as relay:
        assert 2 == relay.run_once().published
        delete_queue(rabbitmq_vhost, queue)
        new = enqueue(engine, amqp_app, 1, task=reserve_stock.name)
        result = relay.run_once()
        assert (1, 0, 0) == (result.claimed, result.published, result.failed)
        assert {(OutboxStatus.PENDING, 1, 0)} == {deliveries(engine, held)[i] for i in held}
        assert 3 == relay.drain().published
    assert {(OutboxStatus.DISPATCHED, 2, 0)} == {deliveries(engine, held)[i] for i in held}
    assert (OutboxStatus.DISPATCHED, 1, 0) == deliveries(engine, new)[new[0]]
    assert sorted(held + new) == sorted(drain_queue(amqp_app, queue))


def test_a_deleted_queue_is_found_by_the_confirmation_checks(
    engine: Engine, amqp_app: Celery, rabbitmq_vhost: str
) -> None:
    """Nothing is published to it after the deletion: the relays' checks find the queue
    gone at two checks and publish its unconfirmed tasks again."""
    queue = amqp_app.conf.task_default_queue
    ids = enqueue(engine, amqp_app, 2, task=reserve_stock.name)
    clock = Clock()
    with Relay(engine, amqp_app, clock=clock) as relay:
        assert 2 == relay.run_once().published
        delete_queue(rabbitmq_vhost, queue)
        clock.advance(LOST_AFTER + 1)
        assert 0 == relay.confirmation.run_once().republished, "gone at one check only"
        clock.advance(ABSENT_TWICE_GAP.total_seconds() + 1)
        assert 2 == relay.confirmation.run_once().republished
        assert 2 == relay.drain().published
    assert {(OutboxStatus.DISPATCHED, 2, 0)} == set(deliveries(engine, ids).values())
    assert sorted(ids) == sorted(drain_queue(amqp_app, queue))
