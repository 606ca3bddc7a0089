"""Publishing through kombu's producer: Redis pipelines, and the plain path for the rest.

A batch goes through one producer from the app's pool. On a transport that publishes at
once (kombu's filesystem, SQS, ...) a message counts as delivered when its publish
returned. On Redis, inside kombu's ``Producer.batch()``, the messages are pipelined:
sent every ``PIPELINE_MESSAGES`` messages and at the end, one round trip per chunk
instead of one a message, and a message counts as delivered once its chunk was sent. If
sending fails, what is known delivered is reported and the rest is not: kombu cannot say
which messages of a failed pipeline got through.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from kombu.exceptions import BatchPublishError  # type: ignore[attr-defined]  # kombu 5.7; stubs lag
from kombu.exceptions import OperationalError as BrokerUnavailable

from outbox.clock import Clock
from outbox.data.outbox_rows import ClaimedRow
from outbox.settings import OutboxSettings
from outbox.tracing import publishing_context
from outbox.transports.family import TransportFamily
from outbox.transports.messages import (
    RowFailedError,
    TaskMessage,
    announce_after,
    announce_before,
)
from outbox.transports.probes import BrokerProbe, OpaqueBrokerProbe
from outbox.transports.publishers import (
    BrokerFailedError,
    Publisher,
    PublishOutcome,
    undeclared,
)

#: Messages buffered in a Redis pipeline before it is sent. A whole batch in one flush
#: would make the first message of a 200-row batch wait for the last to be built (~75 ms
#: here); flushing every 50 messages costs three more round trips a batch (~0.1 ms each).
PIPELINE_MESSAGES = 50
#: kombu's own flush threshold (in Redis commands), set out of reach: the publisher
#: flushes, so that every flush is one this code knows of.
_NO_AUTOMATIC_FLUSH = 2**31


class KombuPublisher(Publisher):
    """Publishes through the app's producer pool, pipelining where the transport can."""

    def publish(self, rows: list[ClaimedRow]) -> PublishOutcome:
        outcome = PublishOutcome()
        sent: list[tuple[ClaimedRow, TaskMessage]] = []
        # How many of ``sent`` are known to be on the broker.
        known = 0
        try:
            with self.celery_app.producer_or_acquire() as producer:
                broker_errors = (BrokerUnavailable, *producer.connection.connection_errors)
                pipelined = producer.supports_batch_publish
                with producer.batch(max_size=_NO_AUTOMATIC_FLUSH) as batch:
                    for row in rows:
                        try:
                            sent.append((row, self._hand_over(row, producer, broker_errors)))
                        except RowFailedError as e:
                            outcome.fail(row, e)
                            continue
                        if not pipelined:
                            known = len(sent)
                        elif len(sent) - known >= PIPELINE_MESSAGES:
                            batch.flush()
                            known = len(sent)
                known = len(sent)
        except (BrokerUnavailable, BatchPublishError, BrokerFailedError) as e:
            outcome.broker_error = e.__cause__ if isinstance(e, BrokerFailedError) else e
        outcome.delivered = sent[:known]
        return outcome

    def _hand_over(
        self, row: ClaimedRow, producer: Any, broker_errors: tuple[type[BaseException], ...]
    ) -> TaskMessage:
        """Give one row's message (and its ``task-sent`` event) to the producer and return
        the message. Raises ``RowFailedError`` when the row is at fault and
        ``BrokerFailedError`` when the broker is."""
        message = self.messages.build(row)
        # The message keeps Celery's declare list, which before_task_publish receives.
        declare = undeclared(message.publish["declare"], producer.connection.declared_entities)
        try:
            with publishing_context(message.headers):
                announce_before(message)
                producer.publish(
                    message.body, retry=False, **{**message.publish, "declare": declare}
                )
                announce_after(message)
                if message.sent_event is not None:
                    self.messages.events.publish(
                        "task-sent", message.sent_event, _Declaring(producer), retry=False
                    )
        except Exception as e:
            self.blame(row, e, broker_errors)
        return message


class _Declaring:
    """The producer as Celery's event dispatcher sees it (it only calls ``publish``),
    leaving out the declaration of an exchange already declared on the connection."""

    def __init__(self, producer: Any) -> None:
        self._producer = producer

    def publish(self, body: Any, **kwargs: Any) -> Any:
        kwargs["declare"] = undeclared(
            kwargs.get("declare"), self._producer.connection.declared_entities
        )
        return self._producer.publish(body, **kwargs)


def _probe(celery_app: Celery, clock: Clock) -> BrokerProbe:
    return OpaqueBrokerProbe(celery_app, clock=clock)


def _publisher(celery_app: Celery, probe: BrokerProbe, settings: OutboxSettings) -> Publisher:
    return KombuPublisher(celery_app, probe)


#: Any other transport kombu speaks (the embedded filesystem one, SQS, ...): it can be
#: pinged, and a publish that returned is taken as delivered.
FAMILY = TransportFamily("kombu", probe=_probe, publisher=_publisher)
