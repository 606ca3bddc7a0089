"""Where a timed run's messages go: the run's Redis DB, or a RabbitMQ virtual host of its own.

A :class:`Broker` tells the child processes where to publish (environment set over the
benchmark's own, which the example reads at import) and lets the benchmark empty a queue
and count what arrived in it. Redis is the run's own DB (:mod:`bench.environment`); a
RabbitMQ virtual host is made by the section that needs it, with :func:`rabbitmq_vhost`,
and deleted when the section ends, however it ends.
"""

from __future__ import annotations

import json
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, replace
from typing import Any

import redis

from bench.data import empty_queue, queue_length
from tests.rabbitmq import AMQP_SERVER, RabbitMQError, delete_vhost, rabbitmqctl


class Broker(ABC):
    """A broker the children publish to, and the benchmark's view of its queues."""

    #: Environment the children run with, over the benchmark's own.
    @property
    @abstractmethod
    def env(self) -> dict[str, str]: ...

    @abstractmethod
    def queue_length(self, queue: str) -> int:
        """Messages ready in ``queue`` (0 if it does not exist)."""

    @abstractmethod
    def empty_queue(self, queue: str) -> None:
        """Drop ``queue``'s messages, keeping the queue."""

    def settled_length(self, queue: str, expected: int, seconds: float = 5) -> int:
        """``queue``'s length once it reached ``expected``, or after ``seconds``: a
        broker may count a message a moment after it confirmed it."""
        deadline = time.monotonic() + seconds
        while (found := self.queue_length(queue)) != expected and time.monotonic() < deadline:
            time.sleep(0.05)
        return found


@dataclass(frozen=True, slots=True)
class RedisBroker(Broker):
    """The run's Redis DB: the children's own ``CELERY_BROKER_URL`` already points there."""

    client: redis.Redis

    @property
    def env(self) -> dict[str, str]:
        return {}

    def queue_length(self, queue: str) -> int:
        return queue_length(self.client, queue)

    def empty_queue(self, queue: str) -> None:
        empty_queue(self.client, queue)


@dataclass(frozen=True, slots=True)
class RabbitMQBroker(Broker):
    """A virtual host on RabbitMQ; children publish there with ``transport_options`` (the
    example's ``CELERY_BROKER_TRANSPORT_OPTIONS``, empty by default)."""

    url: str
    transport_options: dict[str, Any] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        return {
            "CELERY_BROKER_URL": self.url,
            # Always set: the children's transport options are exactly these.
            "CELERY_BROKER_TRANSPORT_OPTIONS": json.dumps(self.transport_options),
        }

    def with_options(self, **options: Any) -> RabbitMQBroker:
        return replace(self, transport_options={**self.transport_options, **options})

    def queue_length(self, queue: str) -> int:
        from amqp.exceptions import NotFound

        with self._connection() as conn:
            try:
                declared = conn.default_channel.queue_declare(queue, passive=True)
            except NotFound:
                return 0
        count: int = declared.message_count
        return count

    def empty_queue(self, queue: str) -> None:
        from amqp.exceptions import NotFound

        # A queue not declared yet has nothing in it.
        with self._connection() as conn, suppress(NotFound):
            conn.default_channel.queue_purge(queue)

    def _connection(self) -> Any:
        from kombu import Connection

        conn = Connection(self.url, connect_timeout=5, heartbeat=0)
        conn.ensure_connection(max_retries=1)
        return conn


@contextmanager
def rabbitmq_vhost() -> Iterator[RabbitMQBroker]:
    """A virtual host of this run's own (``outbox_bench_<pid>``) on the machine's RabbitMQ
    node, full rights for guest; deleted at the end with whatever it holds, however the
    block ends."""
    name = f"outbox_bench_{os.getpid()}"
    try:
        rabbitmqctl("add_vhost", name)
    except RabbitMQError as e:
        raise RuntimeError(
            f"this section needs RabbitMQ, a local node that rabbitmqctl manages: {e}"
        ) from e
    try:
        rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
        yield RabbitMQBroker(f"{AMQP_SERVER}/{name}")
    finally:
        delete_vhost(name)
