"""What every publisher takes and reports, and how it tells a row's fault from the broker's.

Every failure belongs either to a row (its task is not registered, its arguments do not
fit the task, its route leads nowhere) or to the broker. The row's are reported per row,
and the batch goes on without them; the broker's end the batch, and the rows not yet
known to be on the broker stay as they were. A transport's ``connection_errors`` cannot
always tell the two apart (Redis lists ``KeyError``, which is also what a queue missing
from ``task_queues`` raises), so such an error only counts as the broker's when the
broker also fails to answer a fresh connection.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from celery import Celery

from outbox.data.outbox_rows import ClaimedRow
from outbox.transports.messages import MessageBuilder, RowFailedError, TaskMessage
from outbox.transports.probes import BrokerProbe

logger = logging.getLogger(__name__)

#: Longest ``last_error`` kept on a row: a row is not a log file.
MAX_ERROR_LENGTH = 2000


@dataclass(slots=True)
class PublishOutcome:
    """What publishing one batch did."""

    #: Rows known to be on the broker, with the message each was published as.
    delivered: list[tuple[ClaimedRow, TaskMessage]] = field(default_factory=list)
    #: Rows that failed on their own, with the reason.
    failed: list[tuple[ClaimedRow, str]] = field(default_factory=list)
    #: Why the broker failed, ending the batch; ``None`` if it did not.
    broker_error: BaseException | None = None
    #: Queues found deleted from the broker while publishing: whatever they held is gone.
    vanished_queues: set[str] = field(default_factory=set)

    def fail(self, row: ClaimedRow, reason: object) -> None:
        self.failed.append((row, str(reason)[:MAX_ERROR_LENGTH]))


def undeclared(entities: Any, declared: Any) -> list[Any] | None:
    """The entities of a ``declare`` list not yet declared on a connection (``declared``
    is kombu's ``Connection.declared_entities``), or ``None`` when none are left.

    kombu's ``maybe_declare`` finds that out itself, but only after binding a copy of
    each entity to the channel: a copy of the queue and its exchange per message.
    """
    if not entities:
        return None
    left = [entity for entity in entities if hash(entity) not in declared]
    return left or None


class BrokerFailedError(Exception):
    """The broker failed while this batch was handed to it (the cause is chained)."""


class Publisher(ABC):
    """Publishes claimed rows with their stored task ids and options.

    The relay only claims rows, hands them to :meth:`publish` and marks what the outcome
    says is delivered: which messages count as delivered, and when, is each transport
    family's business.
    """

    def __init__(self, celery_app: Celery, probe: BrokerProbe) -> None:
        self.celery_app = celery_app
        self.probe = probe
        self.messages = MessageBuilder(celery_app)

    @abstractmethod
    def publish(self, rows: list[ClaimedRow]) -> PublishOutcome:
        """Publish ``rows`` in order; report which are known to be on the broker."""

    def close(self) -> None:  # noqa: B027 - most publishers borrow the app's pool: nothing to close
        """Let go of any connection of the publisher's own."""

    def blame(self, row: ClaimedRow, error: BaseException, broker_errors: tuple[type, ...]) -> None:
        """Raise ``BrokerFailedError`` if ``error`` is the broker's fault, else
        ``RowFailedError`` (the row is at fault)."""
        if isinstance(error, broker_errors):
            if not self.probe.reachable():
                raise BrokerFailedError from error
            logger.warning(
                "publishing outbox row %s (%s) failed while the broker answers: the row is "
                "at fault",
                row.id,
                row.task_id,
                exc_info=error,
            )
        else:
            logger.error(
                "publishing outbox row %s (%s) failed", row.id, row.task_id, exc_info=error
            )
        raise RowFailedError(f"{type(error).__name__}: {error}") from error
