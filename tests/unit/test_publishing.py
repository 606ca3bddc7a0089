"""Which publisher a broker gets, what makes a row's message fail on its own, and how
RabbitMQ's confirms are counted."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from celery import Celery

from outbox.enqueue.serialization import to_wire
from outbox.transports import (
    ClaimedRow,
    MessageBuilder,
    OpaqueBrokerProbe,
    RowFailedError,
    publisher_for,
)
from outbox.transports.amqp import ConfirmingPublisher, _Confirms
from outbox.transports.kombu import KombuPublisher
from tests.unit.conftest import memory_app


def to_stored(value: Any) -> str:
    """``value`` as the outbox table holds it, and the relay reads it: wire JSON text."""
    return json.dumps(to_wire(value, where="a test row"))


def a_row(task_name: str, args: Any = (), options: Any = None) -> ClaimedRow:
    return ClaimedRow(
        id=1,
        task_id=uuid.uuid4(),
        task_name=task_name,
        args=to_stored(list(args)),
        kwargs="{}",
        options=to_stored(options or {}),
        attempts=0,
        available_at=datetime.now(UTC),
    )


def add(x: int, y: int) -> int:
    return x + y


@pytest.fixture
def app() -> Celery:
    app = memory_app("publishing")
    app.task(name="publishing.add")(add)
    return app


@pytest.mark.parametrize(
    ("url", "publisher"),
    [
        ("amqp://guest:guest@127.0.0.1:5672//", ConfirmingPublisher),
        ("pyamqp://guest:guest@127.0.0.1:5672//", ConfirmingPublisher),
        ("redis://127.0.0.1:6379/0", KombuPublisher),
        ("memory://", KombuPublisher),
    ],
)
def test_each_transport_family_gets_its_publisher(url: str, publisher: type) -> None:
    app = Celery("pick", broker=url, set_as_current=False)
    assert type(publisher_for(app, OpaqueBrokerProbe(app))) is publisher


def test_a_task_the_relay_does_not_know_is_the_row_s_fault(app: Celery) -> None:
    with pytest.raises(RowFailedError, match=r"'publishing\.gone' is not registered"):
        MessageBuilder(app).build(a_row("publishing.gone"))


def test_arguments_that_do_not_fit_the_task_are_the_row_s_fault(app: Celery) -> None:
    with pytest.raises(RowFailedError, match="do not fit"):
        MessageBuilder(app).build(a_row("publishing.add", args=[1, 2, 3]))


def test_a_queue_that_cannot_exist_is_the_row_s_fault(app: Celery) -> None:
    app.conf.task_create_missing_queues = False
    with pytest.raises(RowFailedError, match=r"QueueNotFound: .*'undeclared' missing"):
        MessageBuilder(app).build(a_row("publishing.add", [1, 2], {"queue": "undeclared"}))


def test_a_message_names_its_queue_route_and_row(app: Celery) -> None:
    message = MessageBuilder(app).build(a_row("publishing.add", [1, 2], {"queue": "sums"}))
    assert ("sums", "", "sums") == (
        message.queue,
        message.publish["exchange"],
        message.publish["routing_key"],
    )
    assert 1 == message.headers["celery_outbox_id"]
    assert ([1, 2], {}) == message.body[:2]


def test_confirms_settle_one_tag_or_every_tag_up_to_one() -> None:
    rows = {tag: a_row("publishing.add") for tag in range(1, 6)}
    confirms = _Confirms(outstanding=dict(rows))
    confirms.settle(2, False, confirms.acked)
    confirms.settle(4, True, confirms.nacked)  # 1, 3 and 4: 2 was settled already
    confirms.settle(4, False, confirms.acked)  # settled once: a late duplicate is ignored
    assert ([2], [1, 3, 4], [5]) == (confirms.acked, confirms.nacked, list(confirms.outstanding))
