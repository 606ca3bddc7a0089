"""RabbitMQ: two marker queues tell a restart from a loss of the broker's data.

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

import uuid
from collections.abc import Collection
from typing import Any

from amqp.exceptions import NotFound

from outbox.brokers.base import BrokerProbe, BrokerState

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
