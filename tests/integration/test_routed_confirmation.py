"""The confirmation checks look for a task's message where the relay published it: the
task's own ``queue=``, or a router that reads the task's arguments (``task_routes``).

No worker consumes the routed queues here: the messages wait there, as they do while a
queue's workers are away, and must be found there rather than taken for lost.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from outbox import OutboxSettings, OutboxStatus, Relay, TaskOutbox, idempotent, outbox_table
from outbox.maintenance.confirmation import ABSENT_TWICE_GAP, LOST_AFTER
from tests.integration.test_lost_messages import Clock
from tests.services import app_on

#: Tasks enqueued per test.
TASKS = 3


def queued(app: Celery, queue: str) -> int:
    """Messages waiting in ``queue`` on ``app``'s broker."""
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        if conn.transport.driver_type == "redis":
            return int(channel.client.llen(queue))
        return int(channel.queue_declare(queue=queue, passive=True).message_count)


def delete_queue(app: Celery, queue: str) -> None:
    with app.connection_for_write() as conn:
        if conn.transport.driver_type == "redis":
            conn.default_channel.client.delete(queue)
        else:
            conn.default_channel.queue_delete(queue)


class Routed:
    """An app on this test's broker with two idempotent, late-acknowledged tasks that no
    worker here consumes: one declared with ``queue=``, one routed by its argument."""

    def __init__(self, broker_url: str) -> None:
        self.queue = f"emails-{uuid.uuid4().hex[:8]}"
        by_region = self.queue.replace("emails", "region")

        def route(name: str, args: Any, kwargs: Any, options: Any, **_: Any) -> Any:
            if name == "routed.by_region" and args:
                return {"queue": f"{by_region}-{args[0]}"}
            return None

        self.app = app_on(broker_url, "routed", task_routes=(route,))
        self.by_region = f"{by_region}-eu"

        @self.app.task(name="routed.email", queue=self.queue, acks_late=True, shared=False)
        @idempotent(lambda: Session())
        def email(region: str) -> None:
            """Never runs here."""

        @self.app.task(name="routed.by_region", acks_late=True, shared=False)
        @idempotent(lambda: Session())
        def by_region_task(region: str) -> None:
            """Never runs here."""

    def close(self) -> None:
        for queue in (self.queue, self.by_region):
            delete_queue(self.app, queue)


@pytest.fixture
def routed(broker_url: str) -> Iterator[Routed]:
    routed = Routed(broker_url)
    yield routed
    routed.close()


#: Celery 5.5+ warns that ``queue=`` on a task will stop working in Celery 6; users
#: write it today, and the outbox must route it as Celery does.
QUEUE_ATTRIBUTE = r"ignore:\s*The 'queue' task attribute:celery.exceptions.CDeprecationWarning"
pytestmark = pytest.mark.filterwarnings(QUEUE_ATTRIBUTE)


@pytest.mark.parametrize(
    ("name", "queue"), [("routed.email", "queue"), ("routed.by_region", "by_region")]
)
def test_a_routed_task_waiting_in_its_queue_is_neither_lost_nor_published_again(
    engine: Engine,
    routed: Routed,
    broker_url: str,
    name: str,
    queue: str,
    request: pytest.FixtureRequest,
) -> None:
    """Each check finds the messages in their queue: none is published again, through
    the lost-message checks and past the confirmation timeout alike."""
    where = getattr(routed, queue)
    outbox = TaskOutbox(routed.app)
    with Session(engine) as session:
        for _ in range(TASKS):
            outbox.apply_async(name, args=("eu",), session=session)
        session.commit()
    clock = Clock()
    settings = OutboxSettings(confirm_timeout=60)
    relay = Relay(engine, routed.app, settings, clock=clock)
    request.addfinalizer(relay.close)  # the AMQP publisher's connection is its own
    assert TASKS == relay.drain(maintain=False).published
    with engine.connect() as conn:
        recorded = set(conn.scalars(select(outbox_table.c.published_queue)))
    assert {where} == recorded
    assert TASKS == queued(routed.app, where)

    steps = [LOST_AFTER, ABSENT_TWICE_GAP.total_seconds()]
    if broker_url.startswith("redis"):
        # Redis can say which tasks a queue holds: past the confirmation timeout a task
        # still queued is alive. RabbitMQ cannot list a queue, and publishes it again.
        steps.append(settings.confirm_timeout + 1)
    republished = 0
    for step in steps:
        clock.advance(step)
        republished += relay.confirmation.run_once().republished
        republished += relay.drain(maintain=False).published

    assert 0 == republished
    assert TASKS == queued(routed.app, where)
    with engine.connect() as conn:
        statuses = set(conn.scalars(select(outbox_table.c.status)))
    assert {OutboxStatus.DISPATCHED} == statuses


def test_a_routed_task_whose_message_is_gone_is_published_again_to_its_queue(
    engine: Engine, routed: Routed, request: pytest.FixtureRequest
) -> None:
    """The recorded queue is also where a loss is seen: emptied, it gets the task again."""
    outbox = TaskOutbox(routed.app)
    with Session(engine) as session:
        outbox.apply_async("routed.by_region", args=("eu",), session=session)
        session.commit()
    clock = Clock()
    relay = Relay(engine, routed.app, OutboxSettings(confirm_timeout=60), clock=clock)
    request.addfinalizer(relay.close)
    assert 1 == relay.drain(maintain=False).published
    with routed.app.connection_for_write() as conn:
        conn.default_channel.queue_purge(routed.by_region)
    clock.advance(LOST_AFTER)
    relay.confirmation.run_once()
    clock.advance(ABSENT_TWICE_GAP.total_seconds() + LOST_AFTER + 61)
    relay.confirmation.run_once()
    assert 1 == relay.drain(maintain=False).published
    assert 1 == queued(routed.app, routed.by_region)
