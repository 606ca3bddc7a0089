"""Transports: one module per broker family, giving the relay what it needs of a broker.

A family (:class:`~outbox.transports.family.TransportFamily`) is two things:

- its **publisher** (:class:`~outbox.transports.publishers.Publisher`): publishes claimed
  rows and reports which messages are delivered, in the family's meaning of the word.
  RabbitMQ (py-amqp): acknowledged on a confirm channel (:mod:`outbox.transports.amqp`);
  Redis: sent in a pipeline that completed (:mod:`outbox.transports.redis`, through
  :mod:`outbox.transports.kombu`); anything else kombu speaks: its publish returned.
  Every publisher builds the same messages as ``apply_async``
  (:mod:`outbox.transports.messages`).
- its **probe** (:class:`~outbox.transports.probes.BrokerProbe`): what the broker can
  tell beyond "the publish returned": whether it answers now (``reachable``), whether it
  is the same instance still holding what it was given (``state``), and which tasks'
  messages it holds (``held_task_ids``); ``None`` where the family cannot tell, and the
  confirmation checks fall back to their time-outs.

:func:`family_for` is the one place that picks a family, by the Celery app's kombu
transport: a new broker family is one module here and one line in it. The
``outbox-filesystem://`` transport of the embedded set-up
(:mod:`outbox.transports.filesystem`) publishes through kombu's plain path.
"""

from __future__ import annotations

from celery import Celery

from outbox.clock import Clock, utcnow
from outbox.data.outbox_rows import ClaimedRow
from outbox.settings import OutboxSettings
from outbox.transports import amqp, kombu, redis
from outbox.transports.family import TransportFamily
from outbox.transports.messages import MessageBuilder, RowFailedError, TaskMessage
from outbox.transports.probes import (
    PROBE_TIMEOUT,
    BrokerProbe,
    BrokerState,
    OpaqueBrokerProbe,
    broker_name,
)
from outbox.transports.publishers import (
    MAX_ERROR_LENGTH,
    BrokerFailedError,
    Publisher,
    PublishOutcome,
)

#: The families by kombu's ``driver_type``; any other falls to kombu's plain path.
FAMILIES: dict[str, TransportFamily] = {"redis": redis.FAMILY, "amqp": amqp.FAMILY}


def family_for(celery_app: Celery) -> TransportFamily:
    """The family of ``celery_app``'s broker (decided by its kombu transport)."""
    with celery_app.connection_for_write() as conn:
        driver = conn.transport.driver_type
    return FAMILIES.get(driver, kombu.FAMILY)


def probe_for(celery_app: Celery, *, clock: Clock = utcnow) -> BrokerProbe:
    """The probe for ``celery_app``'s broker."""
    return family_for(celery_app).probe(celery_app, clock)


def publisher_for(
    celery_app: Celery, probe: BrokerProbe, settings: OutboxSettings | None = None
) -> Publisher:
    """The publisher for ``celery_app``'s broker, reporting to ``probe``."""
    return family_for(celery_app).publisher(celery_app, probe, settings or OutboxSettings())


__all__ = [
    "FAMILIES",
    "MAX_ERROR_LENGTH",
    "PROBE_TIMEOUT",
    "BrokerFailedError",
    "BrokerProbe",
    "BrokerState",
    "ClaimedRow",
    "MessageBuilder",
    "OpaqueBrokerProbe",
    "PublishOutcome",
    "Publisher",
    "RowFailedError",
    "TaskMessage",
    "TransportFamily",
    "broker_name",
    "family_for",
    "probe_for",
    "publisher_for",
]
