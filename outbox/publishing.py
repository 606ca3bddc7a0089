"""Handing a claimed batch to the broker, and telling which of its messages got there.

A batch goes through one producer inside kombu's ``Producer.batch()``: on Redis the
messages are pipelined, sent every ``PIPELINE_MESSAGES`` messages and at the end, one
round trip per chunk instead of one a message. A message counts as delivered once it is
known to be on the broker: when its chunk was sent, or (transports that publish at
once) when its publish returned. If sending fails, what is known delivered is reported
and the rest is not: kombu cannot say which messages of a failed pipeline got through.

Every failure belongs either to a row (its task is not registered, its queue cannot
exist) or to the broker. The row's are reported per row, and the batch goes on without
them; the broker's end the batch, and the rows not yet out stay as they were. A
transport's ``connection_errors`` cannot tell the two apart (Redis lists ``KeyError``,
which is also what a queue missing from ``task_queues`` raises), so such an error only
counts as the broker's when the broker also fails to answer a fresh connection.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from celery import Celery
from kombu.exceptions import BatchPublishError  # type: ignore[attr-defined]  # kombu 5.7; stubs lag
from kombu.exceptions import OperationalError as BrokerUnavailable

from outbox.brokers import BrokerProbe
from outbox.lifecycle import ROW_ID_HEADER
from outbox.ordering import KEY_HEADER, SEQ_HEADER
from outbox.serialization import from_wire
from outbox.tracing import publishing_context

logger = logging.getLogger(__name__)

#: Messages buffered in a Redis pipeline before it is sent. A whole batch in one flush
#: would make the first message of a 200-row batch wait for the last to be built (~75 ms
#: here); flushing every 50 messages costs three more round trips a batch (~0.1 ms each).
PIPELINE_MESSAGES = 50
#: kombu's own flush threshold (in Redis commands), set out of reach: the publisher
#: flushes, so that every flush is one this code knows of.
_NO_AUTOMATIC_FLUSH = 2**31
#: Longest ``last_error`` kept on a row: a row is not a log file.
MAX_ERROR_LENGTH = 2000


@dataclass(frozen=True, slots=True)
class ClaimedRow:
    """A claimed row: what publishing it takes, and what recording a failure takes."""

    id: int
    task_id: uuid.UUID
    task_name: str
    args: Any
    kwargs: Any
    options: Any
    attempts: int
    available_at: datetime
    ordering_key: str | None = None
    ordering_seq: int | None = None


@dataclass(slots=True)
class PublishOutcome:
    """What publishing one batch did."""

    #: Rows known to be on the broker, with the task each was published as.
    delivered: list[tuple[ClaimedRow, Any]] = field(default_factory=list)
    #: Rows that failed on their own, with the reason.
    failed: list[tuple[ClaimedRow, str]] = field(default_factory=list)
    #: Why the broker failed, ending the batch; ``None`` if it did not.
    broker_error: BaseException | None = None


class _RowFailedError(Exception):
    """This row cannot be published; the message says why."""


class _BrokerFailedError(Exception):
    """The broker failed while this row was handed to it (the cause is chained)."""


class Publisher:
    """Publishes claimed rows with their stored task ids and options."""

    def __init__(self, celery_app: Celery, probe: BrokerProbe) -> None:
        self.celery_app = celery_app
        self.probe = probe

    def publish(self, rows: list[ClaimedRow]) -> PublishOutcome:
        outcome = PublishOutcome()
        sent: list[tuple[ClaimedRow, Any]] = []
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
                        except _RowFailedError as e:
                            outcome.failed.append((row, str(e)[:MAX_ERROR_LENGTH]))
                            continue
                        if not pipelined:
                            known = len(sent)
                        elif len(sent) - known >= PIPELINE_MESSAGES:
                            batch.flush()
                            known = len(sent)
                known = len(sent)
        except (BrokerUnavailable, BatchPublishError, _BrokerFailedError) as e:
            outcome.broker_error = e.__cause__ if isinstance(e, _BrokerFailedError) else e
        outcome.delivered = sent[:known]
        return outcome

    def _hand_over(
        self, row: ClaimedRow, producer: Any, broker_errors: tuple[type[BaseException], ...]
    ) -> Any:
        """Give one row's message to the producer and return its task.

        Raises ``_RowFailedError`` when the row is at fault and ``_BrokerFailedError``
        when the broker is.
        """
        task = self.celery_app.tasks.get(row.task_name)
        if task is None:
            raise _RowFailedError(f"task {row.task_name!r} is not registered with the relay's app")
        options = from_wire(row.options)
        # Lets the worker record the task's lifecycle on this row by key (outbox.lifecycle).
        headers = options["headers"] = {**(options.get("headers") or {}), ROW_ID_HEADER: row.id}
        if row.ordering_key is not None:
            # Lets the worker hand the key on when the task finishes (outbox.ordering).
            headers[KEY_HEADER] = row.ordering_key
            headers[SEQ_HEADER] = row.ordering_seq
        try:
            with publishing_context(headers):
                task.apply_async(
                    args=from_wire(row.args),
                    kwargs=from_wire(row.kwargs),
                    task_id=str(row.task_id),
                    producer=producer,
                    # No publish retries: a row that is not published stays pending and
                    # the next run tries again, while retrying here would stall the batch.
                    retry=False,
                    **options,
                )
        except broker_errors as e:
            if not self.probe.reachable():
                raise _BrokerFailedError from e
            logger.warning(
                "publishing outbox row %s (%s) failed while the broker answers: the row is "
                "at fault",
                row.id,
                row.task_id,
                exc_info=True,
            )
            raise _RowFailedError(f"{type(e).__name__}: {e}") from e
        except Exception as e:
            logger.exception("publishing outbox row %s (%s) failed", row.id, row.task_id)
            raise _RowFailedError(f"{type(e).__name__}: {e}") from e
        return task
