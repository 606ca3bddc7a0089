"""Redis: ``INFO server`` for restarts, a marker key for lost data, a check count for
data set back to an older copy, and the queue lists plus kombu's ``unacked`` hash for
the messages it holds.

The marker is written once: a Redis restored from an older snapshot or AOF, or a replica
promoted while it lagged, still holds it and has lost only its most recent writes. So
every check also counts itself in the broker (``EPOCH_KEY``, with the time of the latest
check), in the same ``MULTI`` as it reads the marker: the count only grows while the data
goes on, and a copy holds the count and the time of the last check before it was taken.

kombu keeps a queue as a list per priority step (``queue``, ``queue\\x06\\x163``, ...)
and every message delivered to a consumer but not yet acknowledged in one ``unacked``
hash, until the consumer acknowledges it or ``visibility_timeout`` puts it back in its
queue. A message in neither place and not recorded by its consumer is gone: kombu pops
a message and records it as unacknowledged in two steps, and a worker (or Redis) killed
between them takes it along (kombu #305). The key names and the message layout are
kombu's; this module reads them with the transport's own connection settings
(``global_keyprefix``, timeouts, credentials).
"""

from __future__ import annotations

import json
import os
import threading
import uuid
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any

import redis
from celery import Celery

from outbox.clock import Clock, utcnow
from outbox.settings import OutboxSettings
from outbox.transports.family import TransportFamily
from outbox.transports.kombu import KombuPublisher
from outbox.transports.probes import BrokerProbe, BrokerState, broker_name
from outbox.transports.publishers import Publisher

#: The key the relays plant in the broker: its disappearance means the data is gone.
DATA_MARKER_KEY = "celery_outbox:data_marker"
#: A hash of the checks the relays made of the broker's state: ``epoch`` counts them, ``at``
#: says when the latest was made (ISO 8601, by its relay's clock).
EPOCH_KEY = "celery_outbox:epoch"
#: Messages (queued plus unacknowledged) read in one snapshot at most. Beyond that the
#: broker holds a backlog, and telling which tasks it holds would cost more than waiting.
MAX_MESSAGES_READ = 10_000


class RedisProbe(BrokerProbe):
    """Reads a Redis broker through the Celery app's own kombu connection settings.

    ``state`` and ``held_task_ids`` run every few seconds in every relay, so they share
    one connection, made on first use in the process that uses it and dropped after any
    error (the next call connects again). ``reachable`` always connects afresh: it is
    asked whether the broker answers, not whether an old connection still does.
    """

    def __init__(self, celery_app: Celery, *, clock: Clock = utcnow) -> None:
        super().__init__(celery_app, clock=clock)
        self._lock = threading.Lock()
        self._conn: Any = None
        self._conn_pid: int | None = None

    @contextmanager
    def _connection(self) -> Iterator[Any]:
        with self._lock:
            if self._conn is None or self._conn_pid != os.getpid():
                self._conn = self.celery_app.connection_for_write()
                self._conn_pid = os.getpid()
            try:
                yield self._conn
            except BaseException:
                conn, self._conn = self._conn, None
                conn.release()
                raise

    def reachable(self) -> bool:
        try:
            with self.celery_app.connection_for_write() as conn:
                _client(conn).ping()
        except Exception:  # a refused, reset or timed-out connection all mean "no"
            return False
        return True

    def state(
        self, known_marker: str | None = None, known_run_id: str | None = None
    ) -> BrokerState:
        planted = uuid.uuid4().hex
        with self._connection() as conn:
            client, prefix = _client(conn), _prefix(conn)
            key, epoch_key = prefix + DATA_MARKER_KEY, prefix + EPOCH_KEY
            now = self._clock()
            # One MULTI: the previous check's time is read from the same data the count
            # goes on from, however many relays check at once.
            with client.pipeline(transaction=True) as pipe:
                pipe.info("server")
                pipe.set(key, planted, nx=True)
                pipe.get(key)
                pipe.hget(epoch_key, "at")
                pipe.hincrby(epoch_key, "epoch", 1)
                pipe.hset(epoch_key, "at", now.isoformat())
                info, _, marker, previous_at, epoch, _ = pipe.execute()
            uptime = info.get("uptime_in_seconds")
            return BrokerState(
                broker=broker_name(conn),
                data_marker=_text(marker),
                run_id=_text(info["run_id"]) if info.get("run_id") else None,
                started_at=None if uptime is None else now - timedelta(seconds=int(uptime)),
                epoch=int(epoch),
                previous_check_at=_moment(previous_at),
            )

    def held_task_ids(self, queues: Collection[str]) -> set[str] | None:
        with self._connection() as conn:
            client, prefix = _client(conn), _prefix(conn)
            channel: Any = conn.default_channel
            lists = [
                prefix + (f"{queue}{channel.sep}{step}" if step else queue)
                for queue in sorted(set(queues))
                for step in channel.priority_steps
            ]
            unacked = prefix + channel.unacked_key
            with client.pipeline(transaction=True) as pipe:
                for key in lists:
                    pipe.llen(key)
                pipe.hlen(unacked)
                if sum(pipe.execute()) > MAX_MESSAGES_READ:
                    return None
            # One MULTI: a message moving from a queue to ``unacked`` (kombu's restore
            # goes the other way in a MULTI of its own) is seen in exactly one place.
            with client.pipeline(transaction=True) as pipe:
                for key in lists:
                    pipe.lrange(key, 0, MAX_MESSAGES_READ)
                pipe.hvals(unacked)
                *queued, delivered = pipe.execute()
        held = {_message_task_id(raw) for batch in queued for raw in batch}
        held.update(_message_task_id(_unacked_message(raw)) for raw in delivered)
        return {task_id for task_id in held if task_id is not None}


def _client(conn: Any) -> redis.Redis:
    """A plain client on the transport's pool (keys are prefixed by hand: kombu's
    prefixing client only prefixes the commands kombu itself sends)."""
    return redis.Redis(connection_pool=conn.default_channel.pool)


def _prefix(conn: Any) -> str:
    return str(getattr(conn.default_channel, "global_keyprefix", "") or "")


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _moment(value: Any) -> datetime | None:
    """A check's time as ``EPOCH_KEY`` keeps it; ``None`` for none, or one unreadable (a
    hand-edited key): then no moment of the data is known."""
    if value is None:
        return None
    try:
        moment = datetime.fromisoformat(_text(value))
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else None


def _unacked_message(raw: bytes | str) -> Any:
    """kombu stores ``[message, exchange, routing_key]`` per unacknowledged delivery."""
    try:
        entry = json.loads(raw)
    except ValueError:
        return None
    return entry[0] if isinstance(entry, list) and entry else None


def _message_task_id(message: Any) -> str | None:
    """The Celery task id of a kombu message (protocol 2 keeps it in the headers)."""
    if isinstance(message, bytes | str):
        try:
            message = json.loads(message)
        except ValueError:
            return None
    if not isinstance(message, dict):
        return None
    headers = message.get("headers")
    task_id = headers.get("id") if isinstance(headers, dict) else None
    return task_id if isinstance(task_id, str) else None


def _probe(celery_app: Celery, clock: Clock) -> BrokerProbe:
    return RedisProbe(celery_app, clock=clock)


def _publisher(celery_app: Celery, probe: BrokerProbe, settings: OutboxSettings) -> Publisher:
    return KombuPublisher(celery_app, probe)  # pipelined inside Producer.batch()


#: Redis (``redis://``, ``rediss://``, Sentinel): kombu's own transport.
FAMILY = TransportFamily("redis", probe=_probe, publisher=_publisher)
