"""Relays record that they run, so a stopped relay can be told from an idle outbox.

With nothing pending, an outbox whose relay is gone looks healthy: no row waits, so no
lag shows. Each relay (a beat sweep in a worker process, or ``flask outbox relay``)
writes when it last ran into ``celery_outbox_relays``, one row per kind and host, at
most every few seconds; status, ``/healthz`` and the dashboard read it.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from sqlalchemy import delete, select
from sqlalchemy.engine import Connection, Engine

from outbox.clock import Clock, utcnow
from outbox.data import Store
from outbox.data.schema import relays_table

_r = relays_table.c


class RelayKind(StrEnum):
    """What publishes the outbox."""

    #: ``flask outbox relay``, the long-running process.
    RELAY = "relay"
    #: The beat-scheduled sweep task, run by a worker.
    SWEEP = "sweep"
    #: ``flask outbox relay --cdc`` while it streams from the replication slot: polling
    #: relays leave it the rows it streams (``OutboxSettings.cdc_grace``).
    CDC = "cdc"


@dataclass(frozen=True, slots=True)
class RelayRun:
    """When one relay (kind and host) last ran."""

    name: str
    kind: str
    last_seen_seconds_ago: float


class Heartbeat:
    """Writes one relay's ``last_seen_at``; ``beat`` is called by the relay's drains."""

    def __init__(
        self,
        engine: Engine,
        store: Store,
        kind: RelayKind,
        *,
        hostname: str | None = None,
        clock: Clock = utcnow,
    ) -> None:
        self.engine = engine
        self.store = store
        self.kind = kind
        self.name = f"{kind}@{hostname or socket.gethostname()}"[:255]
        self._clock = clock

    def run_once(self) -> None:
        """The relay's own maintenance pass: it runs, now."""
        self.beat(self._clock())

    def beat(self, now: datetime) -> None:
        statement = self.store.upsert(
            relays_table, {"name": self.name, "kind": str(self.kind), "last_seen_at": now}, ["name"]
        )
        with self.engine.begin() as conn:
            conn.execute(statement)

    def forget(self) -> None:
        """Delete this relay's row: it has stopped, and nothing should wait on it."""
        with self.engine.begin() as conn:
            conn.execute(delete(relays_table).where(_r.name == self.name))


def relays_seen(conn: Connection, now: datetime) -> list[RelayRun]:
    """Every relay that has run, latest first (the table holds a row per kind and host)."""
    query = select(_r.name, _r.kind, _r.last_seen_at).order_by(_r.last_seen_at.desc())
    return [
        RelayRun(name, kind, max(0.0, (now - last_seen_at).total_seconds()))
        for name, kind, last_seen_at in conn.execute(query)
    ]


def forget_relays(engine: Engine, seen_before: datetime) -> int:
    """Drop the rows of relays not seen since ``seen_before`` (hosts that are gone)."""
    with engine.begin() as conn:
        return int(conn.execute(delete(relays_table).where(_r.last_seen_at < seen_before)).rowcount)
