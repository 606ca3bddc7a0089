"""What every broker probe answers, and the probe of a broker that can only be pinged.

The seam itself is described in :mod:`outbox.transports`; each broker family's module
(``redis``, ``amqp``) subclasses :class:`BrokerProbe` here.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from celery import Celery

from outbox.clock import Clock, utcnow

#: Seconds a reachability check may take before the broker counts as unreachable.
PROBE_TIMEOUT = 2


@dataclass(frozen=True, slots=True)
class BrokerState:
    """What a broker said about itself, read in one round trip."""

    #: The broker's URL without credentials: which broker this is.
    broker: str
    #: The marker value the broker holds now (written by this read if it held none: it
    #: never had one, or it lost its data).
    data_marker: str
    #: The server instance's id, new at every restart (``None`` if the broker has none).
    run_id: str | None
    #: When that instance started, by the caller's clock (``None`` if unknown).
    started_at: datetime | None
    #: How many times the broker's state was read, this read included: a count kept in
    #: the broker's own data, so that a restore from an older copy of it (an earlier
    #: snapshot, a backup, a lagging replica promoted) sets it back (``None`` if the
    #: broker keeps none).
    epoch: int | None = None
    #: When the read before this one was made, by its reader's clock, as the broker's data
    #: remembers it: the data is at least that recent, and anything given to the broker
    #: since may be missing from a copy (``None`` if it remembers no read).
    previous_check_at: datetime | None = None


class BrokerProbe(ABC):
    """Questions about one Celery app's broker, each bounded by the transport's
    timeouts; ``reachable`` always on a fresh connection."""

    def __init__(self, celery_app: Celery, *, clock: Clock = utcnow) -> None:
        self.celery_app = celery_app
        self._clock = clock
        with celery_app.connection_for_write() as conn:
            #: The broker's URL without credentials, e.g. ``redis://127.0.0.1:6379/0``.
            self.name = broker_name(conn)

    def reachable(self) -> bool:
        """Whether the broker accepts a new connection now (within ``PROBE_TIMEOUT``)."""
        try:
            with self.celery_app.connection_for_write() as conn:
                conn.ensure_connection(max_retries=1, timeout=PROBE_TIMEOUT)
        except Exception:  # any failure to connect is the answer
            return False
        return True

    @abstractmethod
    def state(
        self, known_marker: str | None = None, known_run_id: str | None = None
    ) -> BrokerState | None:
        """The broker's instance and data marker, or ``None`` if it cannot tell.

        ``known_marker`` and ``known_run_id`` are what the outbox recorded of this broker
        last time, for brokers that can only answer "is this one still there?"."""

    @abstractmethod
    def held_task_ids(self, queues: Collection[str]) -> set[str] | None:
        """Ids of the tasks whose messages the broker holds for ``queues`` (waiting in
        them, or delivered from any queue and not yet acknowledged), read as one
        snapshot; ``None`` if it cannot tell (or holds too many to read cheaply)."""

    def missing_queues(self, queues: Collection[str]) -> set[str] | None:
        """Which of ``queues`` the broker no longer has (deleted: whatever they held is
        gone), for a broker that cannot list what a queue holds; ``None`` if it cannot
        tell."""
        return None


class OpaqueBrokerProbe(BrokerProbe):
    """A broker that can only say whether it answers (kombu's filesystem, memory, ...)."""

    def state(
        self, known_marker: str | None = None, known_run_id: str | None = None
    ) -> BrokerState | None:
        return None

    def held_task_ids(self, queues: Collection[str]) -> set[str] | None:
        return None


def broker_name(conn: Any) -> str:
    """A kombu connection's broker as a URL without credentials."""
    transport = conn.transport.driver_type
    port = f":{conn.port}" if conn.port else ""
    vhost = str(conn.virtual_host or "").lstrip("/")
    return f"{transport}://{conn.hostname or 'localhost'}{port}/{vhost}"
