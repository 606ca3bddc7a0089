"""The broker seam: what the relay can learn from a broker beyond "the publish returned".

Three questions, each answered as well as the broker family allows:

- :meth:`BrokerProbe.reachable`: does the broker answer right now, on a fresh
  connection? A publish error of the kind a transport lists among its connection errors
  is only the broker's fault if it does not (a queue missing from ``task_queues``
  raises such an error too, and must not stall every row behind it).
- :meth:`BrokerProbe.state`: which instance is this, and does it still hold what it was
  given? A broker that restarted without its data lost every message it held; one
  restored from an older copy of its data lost what it was given after the copy.
- :meth:`BrokerProbe.held_task_ids`: which tasks' messages does it hold (queued, or
  delivered to a consumer and not yet acknowledged)? A task that is neither held nor
  recorded by its consumer is lost.

``None`` means "this broker cannot tell", and the caller falls back to time-outs.
:func:`probe_for` picks the implementation for a Celery app's broker; adding a broker
family means adding one module here.
"""

from __future__ import annotations

from celery import Celery

from outbox.brokers.base import (
    PROBE_TIMEOUT,
    BrokerProbe,
    BrokerState,
    OpaqueBrokerProbe,
    broker_name,
)
from outbox.clock import Clock, utcnow


def probe_for(celery_app: Celery, *, clock: Clock = utcnow) -> BrokerProbe:
    """The probe for ``celery_app``'s broker (decided by its kombu transport)."""
    with celery_app.connection_for_write() as conn:
        driver = conn.transport.driver_type
    if driver == "redis":
        from outbox.brokers.redis import RedisProbe

        return RedisProbe(celery_app, clock=clock)
    if driver == "amqp":
        from outbox.brokers.amqp import AmqpProbe

        return AmqpProbe(celery_app, clock=clock)
    return OpaqueBrokerProbe(celery_app, clock=clock)


__all__ = [
    "PROBE_TIMEOUT",
    "BrokerProbe",
    "BrokerState",
    "OpaqueBrokerProbe",
    "broker_name",
    "probe_for",
]
