"""Publishing claimed rows: one publisher per transport family, behind one interface.

The relays (the beat sweep, the relay process) only claim rows, hand them to a
:class:`Publisher` and mark what its :class:`PublishOutcome` reports as delivered. What
"delivered" means is the transport family's:

- RabbitMQ (``amqp://``, py-amqp): acknowledged on a confirm channel
  (:mod:`outbox.publishing.amqp`);
- Redis: sent in a pipeline that completed (:mod:`outbox.publishing.kombu`);
- anything else kombu speaks: its publish returned (:mod:`outbox.publishing.kombu`).

Every publisher builds the same messages as ``apply_async`` (:mod:`outbox.publishing.messages`).
"""

from __future__ import annotations

from celery import Celery

from outbox.brokers import BrokerProbe
from outbox.publishing.base import (
    MAX_ERROR_LENGTH,
    BrokerFailedError,
    ClaimedRow,
    Publisher,
    PublishOutcome,
)
from outbox.publishing.messages import MessageBuilder, RowFailedError, TaskMessage
from outbox.settings import OutboxSettings


def publisher_for(
    celery_app: Celery, probe: BrokerProbe, settings: OutboxSettings | None = None
) -> Publisher:
    """The publisher for ``celery_app``'s broker (decided by its kombu transport)."""
    settings = settings or OutboxSettings()
    with celery_app.connection_for_write() as conn:
        driver = conn.transport.driver_type
        implementation = conn.transport.driver_name
    if driver == "amqp" and implementation == "py-amqp":
        from outbox.publishing.amqp import ConfirmingPublisher

        return ConfirmingPublisher(
            celery_app, probe, confirm_timeout=settings.publish_confirm_timeout
        )
    from outbox.publishing.kombu import KombuPublisher

    return KombuPublisher(celery_app, probe)


__all__ = [
    "MAX_ERROR_LENGTH",
    "BrokerFailedError",
    "ClaimedRow",
    "MessageBuilder",
    "PublishOutcome",
    "Publisher",
    "RowFailedError",
    "TaskMessage",
    "publisher_for",
]
