"""RabbitMQ: what the relay publishes with, and what the broker can tell of its messages.

**Publishing** (py-amqp): a batch published on a confirm channel, acknowledged by the broker.

Without publisher confirms, ``basic_publish`` returning means the frames were written to
a socket, not that the broker has the message: a connection that drops a moment later
takes messages the relay would already have marked dispatched. So every message goes on
a channel in confirm mode (``confirm.select``), published ``mandatory``:

- the whole batch is sent without waiting between messages, then the broker's
  ``basic.ack``\\s are awaited together (streaming confirms: one wait a batch, not a round
  trip a message), for at most ``publish_confirm_timeout`` seconds;
- a message counts as delivered once it is acked and was not returned. RabbitMQ acks a
  persistent message to a durable queue once it is written to disk, and a message it
  could not route (``basic.return`` of a ``mandatory`` publish) once it has dropped it;
- a returned message is the row's fault (its route leads to no queue) and is charged to
  the row, unless its queue had been declared on this connection before: then the queue
  was deleted behind the relay's back. It is declared again with the next batch, which
  the row joins uncharged, and the publisher reports the queue as vanished, so that the
  unconfirmed tasks it held are published again (``outbox.maintenance.confirmation``); a
  ``basic.nack`` is the broker refusing it (a full queue that rejects
  publishes, an internal error): the row stays pending, uncharged, and the batch ends as
  a broker failure, as does a confirm time-out or a lost connection. A message the broker
  got whose ack was lost with the connection is published again later under the same
  task id, and its consumer skips it.

Queues are declared, and exchanges checked, on a second channel of the same connection:
a failed declaration closes the channel it ran on, and must not take the batch's
unconfirmed messages with it. The connection is the publisher's own, one per process,
and is dropped after any error (py-amqp's own confirm waits have hung on pooled
connections that broke, celery#9259): the next batch connects afresh.

**Probing**: two marker queues tell a restart from a loss of the broker's data.

AMQP gives a client no instance id, no start time and no way to read a queue without
taking its messages, so this probe plants markers instead and asks, with passive
declarations, whether they are still there:

- a **durable** queue, ``celery_outbox.marker.<token>``: it survives restarts and is
  gone only when the node lost its definitions (reset, a new node behind the same
  address, a wiped data directory). Its token is the broker's ``data_marker``; a new one
  means every unconfirmed task published before may be gone with it;
- a **transient** queue, ``celery_outbox.run.<token>``: RabbitMQ drops it at every
  restart, so its token serves as the ``run_id``. A restart with the data kept loses
  nothing the outbox published (durable queues, persistent messages, confirmed).

Which tokens to look for comes from the outbox's own record (``celery_outbox_brokers``),
passed in by the caller. Messages held for a consumer cannot be listed without taking
them, so ``held_task_ids`` cannot tell: on RabbitMQ a message is never half-taken (a
delivery is the broker's until acknowledged). What it can tell is that a queue is gone
(``missing_queues``, a passive declaration): a queue deleted while it held unconfirmed
tasks took them with it. Confirmation falls back to its time-outs for anything else.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from amqp.exceptions import ChannelError, NotFound
from celery import Celery
from kombu import Exchange, Producer
from kombu.common import maybe_declare
from kombu.exceptions import OperationalError as BrokerUnavailable

from outbox.clock import Clock
from outbox.data.outbox_rows import ClaimedRow
from outbox.errors import OutboxError
from outbox.settings import OutboxSettings
from outbox.tracing import publishing_context
from outbox.transports.family import TransportFamily
from outbox.transports.kombu import KombuPublisher
from outbox.transports.messages import (
    RowFailedError,
    TaskMessage,
    announce_after,
    announce_before,
)
from outbox.transports.probes import BrokerProbe, BrokerState
from outbox.transports.publishers import Publisher, PublishOutcome, undeclared

logger = logging.getLogger(__name__)


class BrokerRefusedError(OutboxError):
    """The broker nacked messages: it did not take them."""


class ConfirmTimeoutError(OutboxError):
    """The broker did not confirm every message of a batch in time."""


@dataclass(slots=True)
class _Confirms:
    """What the broker said about one batch's messages, by delivery tag."""

    #: Tags published and not yet acked or nacked, in order, with the row of each (``None``
    #: for a task-sent event, whose fate does not matter).
    outstanding: dict[int, ClaimedRow | None] = field(default_factory=dict)
    acked: list[int] = field(default_factory=list)
    nacked: list[int] = field(default_factory=list)
    #: Task ids of the messages the broker returned as unroutable, with its reason.
    returned: dict[str, str] = field(default_factory=dict)
    #: Every tag published in the batch, with its row.
    published: dict[int, ClaimedRow | None] = field(default_factory=dict)
    #: Rows published without declaring their queue again (this connection had declared
    #: it before), with the queue's name and the declarations skipped.
    trusted: dict[int, tuple[str, list[Any]]] = field(default_factory=dict)

    def settle(self, tag: int, multiple: bool, into: list[int]) -> None:
        if not multiple:
            if self.outstanding.pop(tag, _MISSING) is not _MISSING:
                into.append(tag)
            return
        for pending in list(self.outstanding):
            if pending > tag:
                break
            del self.outstanding[pending]
            into.append(pending)


_MISSING = object()
#: Seconds spent reading what the broker sent an idle connection before a batch.
_GLANCE = 0.001


class _Link:
    """One connection with its confirm channel, its declaring channel, and the delivery
    tag the next publish gets."""

    def __init__(self, connection: Any) -> None:
        self.connection = connection
        self.pid = os.getpid()
        self.channel = connection.channel()
        self.channel.confirm_select()
        self.next_tag = 1
        self.confirms = _Confirms()
        self.channel.events["basic_ack"].add(self._on_ack)
        self.channel.events["basic_nack"].add(self._on_nack)
        self.channel.events["basic_return"].add(self._on_return)
        self.producer = Producer(self.channel, auto_declare=False)
        self._declaring: Any = None
        #: Exchanges known to exist on this connection.
        self.exchanges: set[str] = {""}

    def _on_ack(self, tag: int, multiple: bool) -> None:
        self.confirms.settle(tag, multiple, self.confirms.acked)

    def _on_nack(self, tag: int, multiple: bool) -> None:
        self.confirms.settle(tag, multiple, self.confirms.nacked)

    def _on_return(self, exc: Exception, exchange: str, routing_key: str, message: Any) -> None:
        task_id = (message.headers or {}).get("id") or message.properties.get("correlation_id")
        if task_id:
            self.confirms.returned[str(task_id)] = (
                f"the broker could not route the message ({exc}): no queue is bound to "
                f"exchange {exchange!r} with routing key {routing_key!r}"
            )

    @property
    def declaring(self) -> Any:
        """The channel declarations run on; reopened after one of them closed it."""
        if self._declaring is None or not self._declaring.is_open:
            self._declaring = self.connection.channel()
        return self._declaring

    def publish(self, row: ClaimedRow | None, body: Any, **kwargs: Any) -> None:
        kwargs["retry"] = False  # a row not confirmed goes out with a later batch
        self.producer.publish(body, **kwargs)
        self.confirms.outstanding[self.next_tag] = row
        self.confirms.published[self.next_tag] = row
        self.next_tag += 1

    def collect(self, timeout: float) -> None:
        """Read what the broker sent (acks, returns, a close) for up to ``timeout`` s."""
        try:
            self.connection.drain_events(timeout=timeout)
        except TimeoutError:
            return

    def close(self, *, broken: bool) -> None:
        """Close the connection; a broken one without waiting for the broker's reply
        (closing politely waits for it with no time limit)."""
        try:
            if broken:
                self.connection.collect()
            else:
                self.connection.close()
        except Exception:  # already broken: nothing to tidy
            logger.debug("closing a broken AMQP connection", exc_info=True)


class ConfirmingPublisher(Publisher):
    """Publishes batches on RabbitMQ with publisher confirms (see the module's text)."""

    def __init__(self, celery_app: Celery, probe: BrokerProbe, *, confirm_timeout: float) -> None:
        super().__init__(celery_app, probe)
        self.confirm_timeout = confirm_timeout
        self._lock = threading.Lock()
        self._link: _Link | None = None

    def close(self) -> None:
        with self._lock:
            self._discard(broken=False)

    def publish(self, rows: list[ClaimedRow]) -> PublishOutcome:
        with self._lock:
            outcome = PublishOutcome()
            try:
                link = self._connected()
            except Exception as e:  # no connection: nothing of the batch went out
                self._discard()
                outcome.broker_error = e
                return outcome
            link.confirms = _Confirms()
            messages: dict[int, TaskMessage] = {}
            try:
                self._send(link, rows, outcome, messages)
                self._await_confirms(link)
            except (
                ChannelError,
                BrokerUnavailable,
                BrokerRefusedError,
                ConfirmTimeoutError,
                *link.connection.connection_errors,
            ) as e:
                outcome.broker_error = e
            self._settle(link, rows, outcome, messages)
            if outcome.broker_error is not None:
                self._discard()
            return outcome

    def _connected(self) -> _Link:
        """This process's link, after reading what the broker said while it was idle (a
        closed connection shows here, before the batch is sent, not half-way)."""
        link = self._link
        if link is not None and link.pid == os.getpid():
            try:
                link.collect(_GLANCE)
                if link.channel.is_open:
                    return link
            except Exception:
                logger.info("the relay's AMQP connection was closed; connecting again")
            self._discard()
        # Heartbeats need a reader; this connection is read only while a batch waits for
        # its confirms, so it asks for none and finds a dead peer by the bounded waits.
        # Every read and write on it is bounded too: a blocked connection (a memory
        # alarm) never answers a declaration, and py-amqp would wait for ever.
        bounded = {"read_timeout": self.confirm_timeout, "write_timeout": self.confirm_timeout}
        connection = self.celery_app.connection_for_write(heartbeat=0, transport_options=bounded)
        connection.ensure_connection(max_retries=1, timeout=max(1, round(self.confirm_timeout)))
        self._link = _Link(connection)
        return self._link

    def _discard(self, *, broken: bool = True) -> None:
        link, self._link = self._link, None
        if link is not None and link.pid == os.getpid():
            link.close(broken=broken)

    def _send(
        self,
        link: _Link,
        rows: list[ClaimedRow],
        outcome: PublishOutcome,
        messages: dict[int, TaskMessage],
    ) -> None:
        for row in rows:
            try:
                message = self.messages.build(row)
                self._declare(link, row, message)
            except RowFailedError as e:
                outcome.fail(row, e)
                continue
            with publishing_context(message.headers):
                announce_before(message)
                try:
                    link.publish(row, message.body, **_on_confirm_channel(message))
                except (ChannelError, *link.connection.connection_errors):
                    raise
                except Exception as e:  # refused before anything was sent (e.g. encoding)
                    logger.error("publishing outbox row %s failed", row.id, exc_info=True)
                    outcome.fail(row, f"{type(e).__name__}: {e}")
                    continue
                messages[row.id] = message
                announce_after(message)
                if message.sent_event is not None:
                    self.messages.events.publish(
                        "task-sent", message.sent_event, _EventProducer(link), retry=False
                    )

    def _declare(self, link: _Link, row: ClaimedRow, message: TaskMessage) -> None:
        """Declare the message's queue and check its exchange, on the declaring channel;
        raise ``RowFailedError`` if either is refused."""
        exchange = message.publish["exchange"]
        name = exchange.name if isinstance(exchange, Exchange) else str(exchange or "")
        try:
            entities = list(message.publish.get("declare") or ())
            declared = link.connection.declared_entities
            left = undeclared(entities, declared)
            if entities and left is None and message.queue:
                link.confirms.trusted[row.id] = (message.queue, entities)
            for entity in left or ():
                maybe_declare(entity, link.declaring)
            if name not in link.exchanges:
                link.declaring.exchange_declare(name, "direct", passive=True)
                link.exchanges.add(name)
        except NotFound as e:
            raise RowFailedError(f"exchange {name!r} does not exist on the broker: {e}") from e
        except ChannelError as e:
            raise RowFailedError(f"the broker refused the message's queue or exchange: {e}") from e

    def _await_confirms(self, link: _Link) -> None:
        deadline = time.monotonic() + self.confirm_timeout
        while link.confirms.outstanding:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ConfirmTimeoutError(
                    f"the broker confirmed {len(link.confirms.acked)} message(s) but not "
                    f"{len(link.confirms.outstanding)} within {self.confirm_timeout:g}s"
                )
            link.collect(remaining)
        if link.confirms.nacked:
            raise BrokerRefusedError(
                f"the broker refused {len(link.confirms.nacked)} message(s) (basic.nack)"
            )

    @staticmethod
    def _settle(
        link: _Link,
        rows: list[ClaimedRow],
        outcome: PublishOutcome,
        messages: dict[int, TaskMessage],
    ) -> None:
        """Fill ``outcome`` from the confirms: acked and not returned is delivered."""
        confirms = link.confirms
        by_tag = {tag: row for tag, row in confirms.published.items() if row is not None}
        acked = {by_tag[tag].id for tag in confirms.acked if tag in by_tag}
        for row in rows:
            if row.id not in acked:
                continue
            reason = confirms.returned.get(str(row.task_id))
            if reason is None:
                outcome.delivered.append((row, messages[row.id]))
            elif row.id in confirms.trusted:
                # Its queue was declared on this connection before, and no longer routes:
                # it was deleted. Declared again with the next batch, which the row joins
                # uncharged; the messages it held are gone (``vanished_queues``).
                queue, entities = confirms.trusted[row.id]
                for entity in entities:
                    link.connection.declared_entities.discard(hash(entity))
                outcome.vanished_queues.add(queue)
            else:
                outcome.fail(row, reason)


def _on_confirm_channel(message: TaskMessage) -> dict[str, Any]:
    """The publish arguments, ``mandatory`` (an unroutable message comes back), and the
    declarations left out: they ran on the declaring channel."""
    publish = dict(message.publish)
    publish["declare"] = None
    publish["mandatory"] = True
    return publish


class _EventProducer:
    """What Celery's event dispatcher publishes through: only ``publish`` is called. The
    event takes a delivery tag on the confirm channel, whose confirm is not waited on
    for any row."""

    def __init__(self, link: _Link) -> None:
        self._link = link

    def publish(self, body: Any, **kwargs: Any) -> None:
        declared = self._link.connection.declared_entities
        for entity in undeclared(kwargs.pop("declare", None), declared) or ():
            maybe_declare(entity, self._link.declaring)
        self._link.publish(None, body, **kwargs)


__all__ = ["BrokerRefusedError", "ConfirmTimeoutError", "ConfirmingPublisher"]


DATA_MARKER_PREFIX = "celery_outbox.marker."
RUN_MARKER_PREFIX = "celery_outbox.run."


class AmqpProbe(BrokerProbe):
    """Reads a RabbitMQ broker's markers on a connection of its own, made for each read."""

    def state(
        self, known_marker: str | None = None, known_run_id: str | None = None
    ) -> BrokerState:
        with self.celery_app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1)
            marker = self._kept_or_planted(conn, DATA_MARKER_PREFIX, known_marker, durable=True)
            run_id = self._kept_or_planted(conn, RUN_MARKER_PREFIX, known_run_id, durable=False)
        return BrokerState(broker=self.name, data_marker=marker, run_id=run_id, started_at=None)

    def held_task_ids(self, queues: Collection[str]) -> set[str] | None:
        return None

    def missing_queues(self, queues: Collection[str]) -> set[str] | None:
        # A passive declaration of each: NOT_FOUND closes the channel it ran on.
        missing = set()
        with self.celery_app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1)
            for queue in queues:
                channel: Any = conn.channel()
                try:
                    channel.queue_declare(queue, passive=True)
                except NotFound:
                    missing.add(queue)
                else:
                    channel.close()
        return missing

    @staticmethod
    def _kept_or_planted(conn: Any, prefix: str, token: str | None, *, durable: bool) -> str:
        """``token`` if its queue is still on the broker, else a new token whose queue is
        declared now."""
        if token:
            channel = conn.channel()
            try:
                channel.queue_declare(prefix + token, passive=True)
            except NotFound:  # the broker closed this channel: the queue is gone
                pass
            else:
                channel.close()
                return token
        planted = uuid.uuid4().hex
        channel = conn.channel()
        try:
            channel.queue_declare(prefix + planted, durable=durable, auto_delete=False)
        finally:
            channel.close()
        return planted


__all__ = ["DATA_MARKER_PREFIX", "RUN_MARKER_PREFIX", "AmqpProbe"]


def _publisher(celery_app: Celery, probe: BrokerProbe, settings: OutboxSettings) -> Publisher:
    with celery_app.connection_for_write() as conn:
        implementation = conn.transport.driver_name
    if implementation == "py-amqp":
        return ConfirmingPublisher(
            celery_app, probe, confirm_timeout=settings.publish_confirm_timeout
        )
    return KombuPublisher(celery_app, probe)  # another AMQP client: no confirm channel


def _probe(celery_app: Celery, clock: Clock) -> BrokerProbe:
    return AmqpProbe(celery_app, clock=clock)


#: RabbitMQ and every AMQP broker kombu speaks to (``amqp://``, ``pyamqp://``).
FAMILY = TransportFamily("amqp", probe=_probe, publisher=_publisher)
