"""The relay publishes the message ``apply_async`` would have, byte for byte, on each broker.

Each case publishes the same task with the same id and options twice into one queue:
once with ``apply_async``, once through the relay's publisher for a row holding those
options. Both messages are then read back raw (the body's bytes, the headers, the
properties, the exchange and routing key) and compared.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from celery import Celery
from celery.events import get_exchange
from kombu import Queue
from kombu.simple import SimpleQueue

from outbox.consumers.lifecycle import ROW_ID_HEADER
from outbox.enqueue.serialization import to_wire
from outbox.ordering.handover import KEY_HEADER, SEQ_HEADER
from outbox.transports import ClaimedRow, probe_for, publisher_for
from tests.services import app_on

TASK = "format.probe"
ROW_ID = 7
ARGS = [1, "two", {"three": [3.5, None]}]
KWARGS = {"order_id": 42, "note": "ü"}
#: Properties that differ between any two publishes: Redis gives each message a random
#: delivery tag, and a relative expiry is counted from the moment of each publish.
_PER_PUBLISH = {"delivery_tag", "expiration"}


def probe_task(*args: Any, **kwargs: Any) -> None:
    """Never runs: the test reads its messages off the queue."""


@pytest.fixture
def format_app(broker_url: str) -> Iterator[Celery]:
    queue = f"format-{uuid.uuid4().hex}"
    app = app_on(broker_url, "message-format", task_default_queue=queue, task_queues=None)
    app.task(name=TASK, acks_late=True, time_limit=60)(probe_task)
    with app.connection_for_write() as conn:
        assert broker_url.split(":")[0] == conn.transport.driver_type
    yield app
    with app.connection_for_write() as conn:
        Queue(queue, channel=conn.default_channel).delete()


def read_raw(app: Celery, queue: str) -> dict[str, Any]:
    """The next message in ``queue`` as the broker holds it."""
    with app.connection_for_read() as conn:
        simple = SimpleQueue(conn.default_channel, queue)
        try:
            message = simple.get(timeout=10)
            message.ack()
        finally:
            simple.close()
    info = message.delivery_info
    return {
        "body": message.body,
        "content_type": message.content_type,
        "content_encoding": message.content_encoding,
        "headers": message.headers,
        "properties": {k: v for k, v in message.properties.items() if k not in _PER_PUBLISH},
        "expiration": message.properties.get("expiration"),
        "route": (info.get("exchange"), info.get("routing_key")),
    }


def publish_both(app: Celery, stored: dict[str, Any], row: ClaimedRow) -> tuple[dict, dict]:
    task = app.tasks[TASK]
    queue = stored.get("queue") or app.conf.task_default_queue
    headers = {**stored.get("headers", {}), ROW_ID_HEADER: row.id}
    if row.ordering_key is not None:
        headers |= {KEY_HEADER: row.ordering_key, SEQ_HEADER: row.ordering_seq}
    options = {k: v for k, v in stored.items() if k != "headers"}
    task.apply_async(
        args=ARGS, kwargs=KWARGS, task_id=str(row.task_id), headers=headers, retry=False, **options
    )
    expected = read_raw(app, queue)
    publisher = publisher_for(app, probe_for(app))
    try:
        outcome = publisher.publish([row])
    finally:
        publisher.close()
    assert [row.id] == [delivered.id for delivered, _ in outcome.delivered], outcome
    return expected, read_raw(app, queue)


def to_stored(value: Any) -> str:
    """``value`` as the outbox table holds it, and the relay reads it: wire JSON text."""
    return json.dumps(to_wire(value, where="a test row"))


def a_row(options: dict[str, Any], *, key: str | None = None) -> ClaimedRow:
    return ClaimedRow(
        id=ROW_ID,
        task_id=uuid.uuid4(),
        task_name=TASK,
        args=to_stored(ARGS),
        kwargs=to_stored(KWARGS),
        options=to_stored(options),
        attempts=0,
        available_at=datetime.now(UTC),
        ordering_key=key,
        ordering_seq=3 if key else None,
    )


def test_a_plain_row_is_published_as_apply_async_publishes_it(format_app: Celery) -> None:
    expected, published = publish_both(format_app, {}, a_row({}))
    assert expected == published
    assert str(ROW_ID) == str(published["headers"][ROW_ID_HEADER])


def test_stored_options_route_and_label_the_message_as_apply_async_would(
    format_app: Celery,
) -> None:
    stored = {
        "queue": f"format-options-{uuid.uuid4().hex}",
        "priority": 3,
        "time_limit": 20.0,
        "soft_time_limit": 10.0,
        "headers": {"tenant": "acme", "traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"},
    }
    try:
        expected, published = publish_both(format_app, stored, a_row(stored))
        assert expected == published
        assert [20.0, 10.0] == published["headers"]["timelimit"]
        assert "acme" == published["headers"]["tenant"]
    finally:
        with format_app.connection_for_write() as conn:
            Queue(stored["queue"], channel=conn.default_channel).delete()


def test_an_expiring_row_carries_the_same_expiry(format_app: Celery) -> None:
    expires = (datetime.now(UTC) + timedelta(minutes=5)).isoformat()
    expected, published = publish_both(
        format_app, {"expires": expires}, a_row({"expires": expires})
    )
    assert expected == published | {"expiration": expected["expiration"]}
    assert expires == published["headers"]["expires"]
    # The broker's TTL is counted from each publish: the relay's came a moment later.
    assert 0 <= int(expected["expiration"]) - int(published["expiration"]) < 5000


def test_an_ordered_row_carries_its_key_and_place(format_app: Celery) -> None:
    row = a_row({}, key="order:42")
    expected, published = publish_both(format_app, {}, row)
    assert expected == published
    assert ("order:42", 3) == (published["headers"][KEY_HEADER], published["headers"][SEQ_HEADER])


def test_the_task_sent_event_matches_apply_async_s(format_app: Celery) -> None:
    """With ``task_send_sent_event`` (the example sets it, for Flower), each publish
    sends a task-sent event with the same fields as ``apply_async``'s."""
    assert format_app.conf.task_send_sent_event
    with format_app.connection_for_read() as conn:
        events = Queue(
            f"format-events-{uuid.uuid4().hex}",
            get_exchange(conn),  # topic on RabbitMQ, fanout (PUBLISH) on Redis
            routing_key="task.sent",
            auto_delete=True,
        )
        simple = SimpleQueue(conn.default_channel, events)
        try:
            # On Redis the subscription starts with the first read: one that finds
            # nothing yet means the consumer listens.
            with pytest.raises(simple.Empty):
                simple.get(timeout=0.5)
            expected, published = publish_both(format_app, {}, a_row({}))
            assert expected == published
            sent = []
            for _ in range(2):
                message = simple.get(timeout=10)
                message.ack()
                sent.append(message.payload)
        finally:
            simple.close()
    # Every event has its own clock and timestamp.
    per_event = {"clock", "timestamp", "local_received", "utcoffset"}
    by_apply_async, by_relay = ({k: v for k, v in e.items() if k not in per_event} for e in sent)
    assert by_apply_async == by_relay
    assert str(expected["headers"]["id"]) == by_relay["uuid"]
