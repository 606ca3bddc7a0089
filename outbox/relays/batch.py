"""Publishing committed outbox rows to the broker.

One batch is one database transaction: claim due pending rows (``FOR UPDATE SKIP LOCKED``
on PostgreSQL, so concurrent relays take disjoint rows and never wait on each other),
publish each with its stored task id (``outbox.transports``), mark the batch, commit. A
relay that dies after publishing and before committing leaves the rows pending; they
are published again under the same task ids, which is what lets consumers deduplicate.

Rows are selected by status and due time, never by "ids above the last one seen": ids
are assigned at INSERT but become visible at COMMIT, so a high-water mark would skip a
row whose transaction committed after a later one.

Between batches, at most every ``MAINTENANCE_INTERVAL`` seconds, a draining relay also
records that it runs (``outbox.maintenance.heartbeat``) and, if it holds its broker's
maintenance lease (one relay at a time does), watches what was dispatched
(``outbox.maintenance.confirmation``) and looks after the ordering keys
(``outbox.maintenance.key_keeper``): ``outbox.maintenance.scheduler``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from celery import Celery
from sqlalchemy import Select, bindparam, select
from sqlalchemy.engine import Connection, Engine

from outbox.clock import Clock, utcnow
from outbox.data import store_for
from outbox.data.outbox_rows import (
    DUE_ROW,
    DUE_UNSTREAMED_ROW,
    ClaimedRow,
    claim_statement,
    claimed_rows,
)
from outbox.data.schema import outbox_table, relays_table
from outbox.maintenance.confirmation import Confirmation, ConfirmationResult
from outbox.maintenance.heartbeat import Heartbeat, RelayKind
from outbox.maintenance.key_keeper import KeyKeeper
from outbox.maintenance.lease import Lease
from outbox.maintenance.scheduler import MaintenanceScheduler
from outbox.ordering.keys import OnFailure
from outbox.relays.outcomes import PublishOutcomes
from outbox.settings import OutboxSettings
from outbox.transports import BrokerProbe, probe_for, publisher_for

logger = logging.getLogger(__name__)

_t = outbox_table.c
_r = relays_table.c
#: Whether a CDC relay has streamed lately (its heartbeat, written with the database's time).
_CDC_LIVE = select(_r.name).where(
    _r.kind == str(RelayKind.CDC), _r.last_seen_at > bindparam("since", type_=_r.last_seen_at.type)
)
#: How often a relay asks whether a CDC relay streams, in seconds.
CDC_CHECK_INTERVAL = 1.0


@dataclass(frozen=True, slots=True)
class BatchResult:
    """What one relay batch did."""

    claimed: int = 0
    published: int = 0
    #: Rows whose publish failed on their own; they were rescheduled or marked dead.
    failed: int = 0
    #: Of ``failed``, the rows that reached ``max_attempts`` and are now dead.
    dead: int = 0
    #: The broker could not be reached; unpublished rows stay pending, uncounted.
    broker_unavailable: bool = False
    #: Queues found deleted from the broker: declared again by the next batch, which the
    #: rows that found them out join, uncharged.
    vanished_queues: int = 0


@dataclass(frozen=True, slots=True)
class DrainResult:
    """What a drain (several batches, and maybe a maintenance pass) did."""

    batches: int
    published: int
    failed: int
    dead: int
    broker_unavailable: bool
    #: Rows the confirmation checks put back to pending to be published again.
    redelivered: int = 0
    #: The maintenance pass of this drain, if one was due.
    confirmation: ConfirmationResult | None = None


class Relay:
    """Moves due pending rows from the outbox table to the broker.

    It keeps nothing about rows between calls (only when the current broker outage began,
    to log it once, what the confirmation checks saw last, and a count of committed
    batches): the beat sweep, a long-running relay process and a test can all hold one,
    and several can run at once against the same table.
    """

    def __init__(
        self,
        engine: Engine,
        celery_app: Celery,
        settings: OutboxSettings | None = None,
        *,
        clock: Clock = utcnow,
        kind: RelayKind = RelayKind.RELAY,
        probe: BrokerProbe | None = None,
        after_publish: Callable[[], None] | None = None,
    ) -> None:
        self.store = store_for(engine)
        engine = self.engine = self.store.outbox_engine(engine)
        self.celery_app = celery_app
        self.settings = settings or OutboxSettings()
        self.probe = probe or probe_for(celery_app, clock=clock)
        self.publisher = publisher_for(celery_app, self.probe, self.settings)
        self.confirmation = Confirmation(
            engine, celery_app, self.settings, store=self.store, probe=self.probe, clock=clock
        )
        self.heartbeat = Heartbeat(engine, self.store, kind, clock=clock)
        self.key_keeper = KeyKeeper(
            engine,
            celery_app,
            OnFailure(self.settings.ordering_on_failure),
            clock=clock,
            max_deliveries=self.settings.max_deliveries,
        )
        #: Its heartbeat every pass; confirmation and the key keeper while this relay
        #: holds the lease of its broker's relays.
        self.maintenance = MaintenanceScheduler(
            own={"heartbeat": self.heartbeat},
            elected={"confirmation": self.confirmation, "key_keeper": self.key_keeper},
            lease=Lease(engine, f"maintenance:{self.probe.name}", store=self.store),
            clock=clock,
        )
        self._clock = clock
        #: What it records of each publish (``after_publish``: called after each message
        #: reaches the broker and before its row is marked, the window a crash test
        #: aims at).
        self.outcomes = PublishOutcomes(self.settings, after_publish=after_publish)
        #: Batches this relay has committed, so a caller can tell a drain that failed
        #: half-way after progress from one that got nothing done.
        self.committed_batches = 0
        self._server_checked = False
        #: Whether a batch's connection is kept for the next batch instead of going back
        #: to the pool. A relay loop keeps it: taking one from the pool costs a checkout
        #: and, with ``pool_pre_ping``, a round trip, on the path from a commit to its
        #: publish. A connection that failed is never kept.
        self.keep_connection = False
        self._kept_connection: Connection | None = None
        self._claim_statement = claim_statement(self.settings.batch_size)
        self._claim_unstreamed = claim_statement(self.settings.batch_size, unstreamed=True)
        #: Whether a CDC relay streamed at the last check (``CDC_CHECK_INTERVAL``).
        self._cdc_live = False
        self._cdc_checked: float | None = None
        #: The database's clock less this relay's, at the last check.
        self._database_ahead = timedelta(0)

    def now(self) -> datetime:
        """The relay's clock (a test may have given it its own)."""
        return self._clock()

    def close(self) -> None:
        """Close the broker connection the publisher keeps (RabbitMQ's confirm channel)
        and return a kept database connection to the pool; the next batch would open
        new ones."""
        self.release_connection()
        self.publisher.close()
        self.maintenance.stop()

    def release_connection(self) -> None:
        """Return the kept database connection (``keep_connection``) to the pool."""
        kept, self._kept_connection = self._kept_connection, None
        if kept is not None:
            kept.close()

    def __enter__(self) -> Relay:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def run_once(self) -> BatchResult:
        """Claim, publish and mark at most one batch of due rows, in one transaction."""
        kept, self._kept_connection = self._kept_connection, None
        conn = kept or self.store.relay_connection(self.engine)
        try:
            with conn.begin():
                if not self._server_checked:
                    self.store.check_server(conn)
                    self._server_checked = True
                rows = self._claim(conn)
                if not rows:
                    outcome = None
                else:
                    outcome = self.publisher.publish(rows)
                    self.outcomes.note_broker(outcome.broker_error)
                    now = self._clock()
                    self.outcomes.mark_dispatched(conn, outcome.delivered, now)
                    dead = sum(
                        self.outcomes.record_failure(conn, row, error, now)
                        for row, error in outcome.failed
                    )
        except BaseException:
            # Whatever went wrong, the next batch starts on a connection the pool hands
            # out (and pings), not on one that may be broken.
            conn.close()
            raise
        if self.keep_connection:
            self._kept_connection = conn
        else:
            conn.close()
        if outcome is None:
            return BatchResult()
        self.committed_batches += 1
        if outcome.vanished_queues:
            self.confirmation.queues_deleted(outcome.vanished_queues, now)
        return BatchResult(
            claimed=len(rows),
            published=len(outcome.delivered),
            failed=len(outcome.failed),
            dead=dead,
            broker_unavailable=outcome.broker_error is not None,
            vanished_queues=len(outcome.vanished_queues),
        )

    def drain(
        self,
        max_seconds: float | None = None,
        *,
        stop: Callable[[], bool] | None = None,
        maintain: bool = True,
    ) -> DrainResult:
        """Run batches until no due row is left, the broker is down, time is up, or
        ``stop()`` says so (checked between batches).

        First, if one is due, a maintenance pass (:meth:`maintain`); ``maintain=False``
        leaves it to the caller (the relay loop runs it in a thread of its own, off the
        path from a commit to its publish).
        """
        deadline = time.monotonic() + (max_seconds or self.settings.sweep_max_seconds)
        maintained = self.maintain_if_due() if maintain else None
        batches = published = failed = dead = 0
        while True:
            result = self.run_once()
            batches += 1
            published += result.published
            failed += result.failed
            dead += result.dead
            if (
                result.broker_unavailable
                or (result.claimed < self.settings.batch_size and not result.vanished_queues)
                or time.monotonic() >= deadline
                or (stop is not None and stop())
            ):
                return DrainResult(
                    batches,
                    published,
                    failed,
                    dead,
                    result.broker_unavailable,
                    redelivered=maintained.republished if maintained else 0,
                    confirmation=maintained,
                )

    def maintain(self) -> ConfirmationResult:
        """Run every maintenance pass now, whichever relay holds the lease: record that
        this relay runs, run the confirmation checks once, then look after the ordering
        keys (``outbox.maintenance.key_keeper.KeyKeeper``)."""
        return cast(ConfirmationResult, self.maintenance.run_now()["confirmation"])

    def maintain_if_due(self) -> ConfirmationResult | None:
        """The scheduled pass, at most every ``MAINTENANCE_INTERVAL``: the heartbeat, and
        the outbox-wide passes if this relay holds the lease (their confirmation result;
        ``None`` when they did not run here)."""
        results = self.maintenance.run_if_due()
        return None if results is None else cast(ConfirmationResult, results["confirmation"])

    def _claim(self, conn: Connection) -> list[ClaimedRow]:
        self.store.lock_for_claim(conn)
        now = self._clock()
        streamed_after = self.streamed_after(conn, now)
        if streamed_after is None:
            rows = conn.execute(self._claim_statement, {"now": now})
        else:
            rows = conn.execute(
                self._claim_unstreamed, {"now": now, "streamed_after": streamed_after}
            )
        return claimed_rows(rows)

    def streamed_after(self, conn: Connection, now: datetime) -> datetime | None:
        """While a CDC relay streams: the creation time after which a row it streams is
        left to it (``OutboxSettings.cdc_grace`` before the database's clock, told by this
        relay's); ``None`` when none streams."""
        if not self.store.streams_changes:
            return None
        grace = timedelta(seconds=self.settings.cdc_grace)
        checked = self._cdc_checked
        if checked is None or time.monotonic() - checked >= CDC_CHECK_INTERVAL:
            database_now = self.store.database_now(conn)
            self._database_ahead = database_now - now
            since = database_now - grace
            self._cdc_live = conn.execute(_CDC_LIVE, {"since": since}).first() is not None
            self._cdc_checked = time.monotonic()
        return now + self._database_ahead - grace if self._cdc_live else None

    def has_due_rows(self, conn: Connection) -> bool:
        """Whether a row is due: the first entry of the pending rows' index, read without
        a lock (what a relay loop asks where the database cannot notify it). Rows a
        running CDC relay streams do not count."""
        now = self._clock()
        streamed_after = self.streamed_after(conn, now)
        if streamed_after is None:
            return conn.execute(DUE_ROW, {"now": now}).first() is not None
        found = conn.execute(DUE_UNSTREAMED_ROW, {"now": now, "streamed_after": streamed_after})
        return found.first() is not None

    def claim_query(self) -> Select[Any]:
        """The statement that claims one batch, due now (public so its plan can be
        checked; a batch runs the same statement, built once)."""
        return self._claim_statement.params(now=self._clock())
