"""The outbox's promises on each broker: Redis, then RabbitMQ, with a real worker on each.

The RabbitMQ worker is the example's ``celery -A tasks worker`` with ``CELERY_BROKER_URL``
pointing at this run's virtual host, which is how the README switches the example.
"""

from __future__ import annotations

import uuid

import redis
from celery import Celery
from kombu import Queue
from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session

from outbox import OutboxSettings, OutboxStatus, Relay, TaskOutbox, outbox_table
from outbox.data import store_for
from outbox.data.schema import brokers_table
from outbox.maintenance.confirmation import Confirmation
from outbox.transports import BrokerState, probe_for
from outbox.transports.amqp import DATA_MARKER_PREFIX, AmqpProbe
from outbox.transports.redis import EPOCH_KEY, RedisProbe
from tasks.orders import notify_customer
from tests.integration.test_delivery import make_order, notifications, row_status
from tests.rabbitmq import delete_queue
from tests.services import wait_for

_t = outbox_table.c


def notify_of_a_new_order(engine: Engine, app: Celery) -> tuple[int, str]:
    """A new order and its notice enqueued in one committed transaction."""
    order_id = make_order(engine)
    with Session(engine) as session:
        result = TaskOutbox(app).apply_async(notify_customer, args=(order_id,), session=session)
        session.commit()
    return order_id, result.id


def test_a_committed_enqueue_runs_exactly_once(engine: Engine, stack: tuple[Celery, str]) -> None:
    app, _worker = stack
    order_id, task_id = notify_of_a_new_order(engine, app)
    with Relay(engine, app) as relay:
        assert 1 == relay.drain().published
        assert 0 == relay.drain().published
    wait_for(lambda: notifications(engine, order_id), timeout=30)
    assert [task_id] == notifications(engine, order_id)
    assert OutboxStatus.DISPATCHED == row_status(engine, task_id)


def test_a_task_published_again_is_applied_once(engine: Engine, stack: tuple[Celery, str]) -> None:
    """The row goes back to pending after its task ran (a relay that crashed before its
    mark would leave it so): the second delivery, under the same id, is skipped."""
    app, _worker = stack
    order_id, task_id = notify_of_a_new_order(engine, app)
    with Relay(engine, app) as relay:
        relay.drain()
        wait_for(lambda: notifications(engine, order_id), timeout=30)
        with engine.begin() as conn:
            conn.execute(
                update(outbox_table)
                .where(_t.task_id == uuid.UUID(task_id))
                .values(status=OutboxStatus.PENDING)
            )
        assert 1 == relay.drain().published
    wait_for(lambda: row_status(engine, task_id) == OutboxStatus.DISPATCHED, timeout=30)
    wait_for(lambda: _delivered_twice_and_consumed(engine, task_id), timeout=30)
    assert [task_id] == notifications(engine, order_id)


def _delivered_twice_and_consumed(engine: Engine, task_id: str) -> bool:
    """Both deliveries ran (the second skipping its body): the lifecycle counts two runs."""
    with engine.connect() as conn:
        deliveries, runs = conn.execute(
            select(_t.deliveries, _t.task_runs).where(_t.task_id == uuid.UUID(task_id))
        ).one()
    return bool(deliveries == 2 and runs == 2)


def test_the_health_probe_answers_on_each_broker(stack: tuple[Celery, str]) -> None:
    app, _worker = stack
    assert probe_for(app).reachable()


def test_rabbitmq_that_lost_its_definitions_gets_back_what_was_unconfirmed(
    engine: Engine, rabbitmq_app: Celery, rabbitmq_vhost: str
) -> None:
    """The durable marker queue vanishes as it would with a reset node: every task
    published before and not yet confirmed by its consumer is published again."""
    queue = f"unconsumed-{uuid.uuid4().hex}"
    with Session(engine) as session:
        ids = [
            TaskOutbox(rabbitmq_app)
            .apply_async(notify_customer, args=(i,), queue=queue, session=session)
            .id
            for i in range(3)
        ]
        session.commit()
    probe = probe_for(rabbitmq_app)
    assert isinstance(probe, AmqpProbe)
    settings = OutboxSettings()
    confirmation = Confirmation(
        engine, rabbitmq_app, settings, store=store_for(engine), probe=probe
    )
    try:
        with Relay(engine, rabbitmq_app, settings, probe=probe) as relay:
            assert 3 == relay.drain(maintain=False).published
        assert 0 == confirmation.run_once().republished  # the marker is planted
        assert 0 == confirmation.run_once().republished  # and found again
        delete_queue(rabbitmq_vhost, DATA_MARKER_PREFIX + _remembered_marker(engine, probe.name))
        result = confirmation.run_once()
        assert (3, True) == (result.republished, result.broker_data_lost)
        assert {OutboxStatus.PENDING} == {row_status(engine, i) for i in ids}
    finally:
        with rabbitmq_app.connection_for_write() as conn:
            Queue(queue, channel=conn.default_channel).delete()


def _remembered_marker(engine: Engine, broker: str) -> str:
    with engine.connect() as conn:
        marker: str = conn.execute(
            select(brokers_table.c.data_marker).where(brokers_table.c.broker == broker)
        ).scalar_one()
    return marker


def test_relays_checking_redis_in_turn_see_no_loss(
    engine: Engine, celery_app: Celery, redis_client: redis.Redis
) -> None:
    """Two relays check the same Redis in turn, with tasks published between their
    checks: each advances the broker's epoch past what the other recorded, nothing is
    taken for lost, and the highest epoch is the one recorded."""
    queue = f"epoch-{uuid.uuid4().hex[:8]}"
    relays = [Relay(engine, celery_app), Relay(engine, celery_app)]
    try:
        for relay in relays * 3:
            with Session(engine) as session:
                TaskOutbox(celery_app).apply_async(
                    notify_customer, args=(1,), queue=queue, session=session
                )
                session.commit()
            assert 1 == relay.drain(maintain=False).published
            result = relay.confirmation.run_once()
            assert (0, False) == (result.republished, result.broker_data_lost)
    finally:
        redis_client.delete(queue)
    assert int(redis_client.hget(EPOCH_KEY, "epoch") or 0) == _remembered_epoch(engine)


class CheckedMeanwhile(RedisProbe):
    """A relay's probe that is slow to report: another relay makes a whole check between
    its read of the broker and its record of the epoch it read."""

    def __init__(self, celery_app: Celery, other: Relay) -> None:
        super().__init__(celery_app)
        self.other = other

    def state(
        self, known_marker: str | None = None, known_run_id: str | None = None
    ) -> BrokerState:
        state = super().state(known_marker, known_run_id)
        assert not self.other.confirmation.run_once().broker_data_lost
        return state


def test_a_relay_recording_last_keeps_the_higher_epoch(
    engine: Engine, celery_app: Celery, redis_client: redis.Redis
) -> None:
    """The relay whose record comes last read the lower epoch: the higher one stays
    recorded (a restore to a copy between the two checks would otherwise go unseen), and
    neither relay takes anything for lost."""
    fast = Relay(engine, celery_app)
    slow = Relay(engine, celery_app, probe=CheckedMeanwhile(celery_app, fast))
    assert not fast.confirmation.run_once().broker_data_lost
    for relay in (slow, fast, slow):
        assert not relay.confirmation.run_once().broker_data_lost
    assert int(redis_client.hget(EPOCH_KEY, "epoch") or 0) == _remembered_epoch(engine)


def _remembered_epoch(engine: Engine) -> int | None:
    with engine.connect() as conn:
        epoch: int | None = conn.execute(select(brokers_table.c.epoch)).scalar_one()
    return epoch
