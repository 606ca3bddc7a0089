"""Publishing committed outbox rows to the broker.

One batch is one database transaction: claim due pending rows (``FOR UPDATE SKIP LOCKED``
on PostgreSQL, so concurrent relays take disjoint rows and never wait on each other),
publish each with its stored task id, mark the batch, commit. A relay that dies after
publishing and before committing leaves the rows pending; they are published again
under the same task ids, which is what lets consumers deduplicate.

Rows are selected by status and due time, never by "ids above the last one seen": ids
are assigned at INSERT but become visible at COMMIT, so a high-water mark would skip a
row whose transaction committed after a later one.
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from celery import Celery
from kombu.exceptions import BatchPublishError  # type: ignore[attr-defined]  # kombu 5.7; stubs lag
from kombu.exceptions import OperationalError as BrokerUnavailable
from sqlalchemy import Select, case, exists, false, select, update
from sqlalchemy.engine import Connection, Engine

from outbox.enqueue import utcnow
from outbox.idempotency import ProcessedMessage, confirms_processing
from outbox.lifecycle import ROW_ID_HEADER
from outbox.metrics import DISPATCH_LAG, PUBLISH_FAILURES, PUBLISHED
from outbox.schema import OutboxStatus, outbox_table
from outbox.serialization import from_wire
from outbox.settings import OutboxSettings
from outbox.tracing import publishing_context

logger = logging.getLogger(__name__)

_t = outbox_table.c
_CLAIM_COLUMNS = (
    _t.id,
    _t.task_id,
    _t.task_name,
    _t.args,
    _t.kwargs,
    _t.options,
    _t.attempts,
    _t.available_at,
)


#: Messages buffered in a Redis pipeline before it is sent. A whole batch in one flush
#: would make the first message of a 200-row batch wait for the last to be built (~75 ms
#: here); flushing every 50 messages costs three more round trips a batch (~0.1 ms each).
PIPELINE_MESSAGES = 50
#: kombu's own flush threshold (in Redis commands), set out of reach: the relay flushes.
_NO_AUTOMATIC_FLUSH = 2**31
#: Longest wait between two redelivery checks of a draining relay (seconds).
MAX_CONFIRM_CHECK_INTERVAL = 5.0


class _BrokerDownError(Exception):
    """Publishing stopped because the broker, not the row, failed (the cause is chained)."""


@dataclass(frozen=True, slots=True)
class _Claimed:
    """A claimed row: what the relay needs to publish it and to record a failure."""

    id: int
    task_id: uuid.UUID
    task_name: str
    args: Any
    kwargs: Any
    options: Any
    attempts: int
    available_at: datetime


@dataclass(slots=True)
class _Published:
    """What publishing one claimed batch did."""

    ids: list[int] = field(default_factory=list)
    #: Of ``ids``, rows whose consumer records processed ids (see ``redeliver_unconfirmed``).
    awaiting_confirmation: list[int] = field(default_factory=list)
    failures: list[tuple[_Claimed, str]] = field(default_factory=list)
    broker_unavailable: bool = False


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


@dataclass(frozen=True, slots=True)
class DrainResult:
    """What a drain (several batches) did."""

    batches: int
    published: int
    failed: int
    dead: int
    broker_unavailable: bool
    #: Dispatched rows put back (or marked dead) because no consumer confirmed them.
    redelivered: int = 0


class Relay:
    """Moves due pending rows from the outbox table to the broker.

    It keeps nothing about rows between calls (only when the current broker outage began,
    to log it once, and a count of committed batches): the beat sweep, a long-running
    relay process and a test can all hold one, and several can run at once against the
    same table.
    """

    def __init__(
        self,
        engine: Engine,
        celery_app: Celery,
        settings: OutboxSettings | None = None,
        *,
        clock: Callable[[], datetime] = utcnow,
        after_publish: Callable[[], None] | None = None,
    ) -> None:
        self.engine = engine
        self.celery_app = celery_app
        self.settings = settings or OutboxSettings()
        self._clock = clock
        #: Called after each message reaches the broker and before its row is marked:
        #: the window a crash test aims at.
        self._after_publish = after_publish
        # When the current broker outage began (monotonic), so it is logged once, not per
        # row or per sweep.
        self._outage_started: float | None = None
        #: Batches this relay has committed, so a caller can tell a drain that failed
        #: half-way after progress from one that got nothing done.
        self.committed_batches = 0
        # When drain() next looks for dispatched tasks nobody confirmed.
        self._next_confirm_check: datetime | None = None

    def now(self) -> datetime:
        """The relay's clock (a test may have given it its own)."""
        return self._clock()

    def run_once(self) -> BatchResult:
        """Claim, publish and mark at most one batch of due rows, in one transaction."""
        with self._connect() as conn, conn.begin():
            rows = self._claim(conn)
            if not rows:
                return BatchResult()
            outcome = self._publish(rows)
            now = self._clock()
            if outcome.ids:
                deadline = now + timedelta(seconds=self.settings.confirm_timeout)
                conn.execute(
                    update(outbox_table)
                    .where(_t.id.in_(outcome.ids))
                    .values(
                        status=OutboxStatus.DISPATCHED,
                        dispatched_at=now,
                        attempts=_t.attempts + 1,
                        last_error=None,
                        confirm_deadline=case(
                            (_t.id.in_(outcome.awaiting_confirmation), deadline), else_=None
                        )
                        if outcome.awaiting_confirmation
                        else None,
                    )
                )
            dead = sum(
                self._record_failure(conn, row, error, now) for row, error in outcome.failures
            )
        self.committed_batches += 1
        return BatchResult(
            claimed=len(rows),
            published=len(outcome.ids),
            failed=len(outcome.failures),
            dead=dead,
            broker_unavailable=outcome.broker_unavailable,
        )

    def redeliver_unconfirmed(self) -> int:
        """Publish again the dispatched tasks no idempotent consumer recorded in time.

        A broker can drop a message: kombu's Redis transport pops it before recording it
        as unacknowledged, so a worker killed in between takes it along. Such rows are put
        back to pending (their consumer deduplicates, so a late original is harmless);
        rows already published ``max_attempts`` times become dead instead. Returns how
        many rows were put back or marked dead.
        """
        now = self._clock()
        overdue = _t.confirm_deadline <= now
        with self._connect() as conn, conn.begin():
            processed = exists().where(ProcessedMessage.task_id_matches(_t.task_id, conn.dialect))
            conn.execute(
                update(outbox_table).where(overdue, processed).values(confirm_deadline=None)
            )
            unconfirmed = overdue & (_t.status == OutboxStatus.DISPATCHED)
            self._give_up_on_expired(conn, unconfirmed, now)
            error = (
                f"no consumer recorded this task as processed within "
                f"{self.settings.confirm_timeout:g}s of dispatch"
            )
            dead = conn.execute(
                update(outbox_table)
                .where(unconfirmed, _t.attempts >= self.settings.max_attempts)
                .values(status=OutboxStatus.DEAD, confirm_deadline=None, last_error=error)
            ).rowcount
            again = conn.execute(
                update(outbox_table)
                .where(unconfirmed)
                .values(
                    status=OutboxStatus.PENDING,
                    available_at=now,
                    confirm_deadline=None,
                    last_error=error + "; published again",
                )
            ).rowcount
        if dead or again:
            logger.warning(
                "%d dispatched task(s) were never confirmed by their consumer: %d published "
                "again, %d dead after %d attempts",
                dead + again,
                again,
                dead,
                self.settings.max_attempts,
            )
        return int(dead + again)

    def _give_up_on_expired(self, conn: Connection, unconfirmed: Any, now: datetime) -> None:
        """Stop tracking tasks whose ``expires`` has passed: a worker discards them unrun,
        so no consumer will ever confirm them, and publishing them again is pointless."""
        rows = conn.execute(select(_t.id, _t.options).where(unconfirmed)).all()
        expired = [
            row.id
            for row in rows
            if isinstance(row.options, dict)
            and isinstance(row.options.get("expires"), str)
            and datetime.fromisoformat(row.options["expires"]) <= now
        ]
        if expired:
            conn.execute(
                update(outbox_table)
                .where(_t.id.in_(expired))
                .values(confirm_deadline=None, last_error="expired before any consumer ran it")
            )

    def drain(
        self, max_seconds: float | None = None, *, stop: Callable[[], bool] | None = None
    ) -> DrainResult:
        """Run batches until no due row is left, the broker is down, time is up, or
        ``stop()`` says so (checked between batches)."""
        deadline = time.monotonic() + (max_seconds or self.settings.sweep_max_seconds)
        redelivered = self._maybe_redeliver_unconfirmed()
        batches = published = failed = dead = 0
        while True:
            result = self.run_once()
            batches += 1
            published += result.published
            failed += result.failed
            dead += result.dead
            if (
                result.broker_unavailable
                or result.claimed < self.settings.batch_size
                or time.monotonic() >= deadline
                or (stop is not None and stop())
            ):
                return DrainResult(
                    batches, published, failed, dead, result.broker_unavailable, redelivered
                )

    def _maybe_redeliver_unconfirmed(self) -> int:
        """Run the redelivery check at most every few seconds (by the relay's clock).

        It is a transaction of several statements, and a relay woken by every commit
        drains hundreds of times a second: checking each time would cost more than the
        batches themselves, while a deadline counted in minutes loses nothing by a check
        a few seconds late.
        """
        now = self._clock()
        if self._next_confirm_check is not None and now < self._next_confirm_check:
            return 0
        interval = min(MAX_CONFIRM_CHECK_INTERVAL, self.settings.confirm_timeout / 4)
        self._next_confirm_check = now + timedelta(seconds=interval)
        return self.redeliver_unconfirmed()

    def _connect(self) -> Connection:
        conn = self.engine.connect()
        if conn.dialect.name == "postgresql":
            # Row locks only protect a claim inside a real transaction: an engine configured
            # for AUTOCOMMIT would drop them before the rows are published.
            conn = conn.execution_options(isolation_level="READ COMMITTED")
        return conn

    def _claim(self, conn: Connection) -> list[_Claimed]:
        if conn.dialect.name == "sqlite":
            # SQLite has no row locks: take the database write lock before reading so two
            # relays cannot claim the same rows. A write statement that matches nothing
            # takes it under any of pysqlite's transaction modes, where an explicit
            # BEGIN IMMEDIATE would clash with one the application's hooks already began.
            conn.execute(update(outbox_table).where(false()).values(status=OutboxStatus.PENDING))
        return [_Claimed(**row._mapping) for row in conn.execute(self.claim_query())]

    def claim_query(self) -> Select[Any]:
        """The statement that claims one batch (public so its plan can be checked)."""
        return (
            select(*_CLAIM_COLUMNS)
            .where(_t.status == OutboxStatus.PENDING, _t.available_at <= self._clock())
            # The same order as the partial index, so the scan stops after batch_size rows.
            .order_by(_t.available_at, _t.id)
            .limit(self.settings.batch_size)
            .with_for_update(skip_locked=True, of=outbox_table)
        )

    def _publish(self, rows: list[_Claimed]) -> _Published:
        """Publish a claimed batch through one producer, pipelined where the transport can.

        On Redis, kombu buffers the publishes in a pipeline, sent every
        ``PIPELINE_MESSAGES`` messages and at the end: one round trip per chunk instead of
        one a message. A message counts as published once it is known to be on the broker:
        when its chunk was sent, or (transports that publish at once) when its publish
        returned. If sending fails, the messages known to be out are marked and the rest
        stay pending, to be published again under the same task ids: kombu cannot say
        which messages of a failed pipeline got through.
        """
        result = _Published()
        sent: list[tuple[_Claimed, Any]] = []
        # How many of ``sent`` are known to be on the broker.
        delivered = 0
        try:
            with self.celery_app.producer_or_acquire() as producer:
                broker_errors = (BrokerUnavailable, *producer.connection.connection_errors)
                pipelined = producer.supports_batch_publish
                # Flushed by hand below, never by kombu on its own, so that every flush
                # is one this code knows of.
                with producer.batch(max_size=_NO_AUTOMATIC_FLUSH) as batch:
                    for row in rows:
                        task = self._publish_one(row, producer, result, broker_errors)
                        if task is not None:
                            sent.append((row, task))
                        if not pipelined:
                            delivered = len(sent)
                        elif len(sent) - delivered >= PIPELINE_MESSAGES:
                            batch.flush()
                            delivered = len(sent)
                delivered = len(sent)
        except (BrokerUnavailable, BatchPublishError, _BrokerDownError) as e:
            self._broker_down(e.__cause__ if isinstance(e, _BrokerDownError) else e)
            PUBLISH_FAILURES.labels(reason="broker").inc()
            result.broker_unavailable = True
        else:
            self._broker_up()
        now = self._clock()
        for row, task in sent[:delivered]:
            result.ids.append(row.id)
            PUBLISHED.labels(task=row.task_name).inc()
            DISPATCH_LAG.observe(max(0.0, (now - row.available_at).total_seconds()))
            if confirms_processing(task):
                result.awaiting_confirmation.append(row.id)
            if self._after_publish is not None:
                self._after_publish()
        return result

    def _publish_one(
        self,
        row: _Claimed,
        producer: Any,
        result: _Published,
        broker_errors: tuple[type[BaseException], ...],
    ) -> Any:
        """Hand one row to the producer; return its task, or ``None`` if the row failed on
        its own (recorded in ``result``). Raises ``_BrokerDownError`` if the broker is at fault.
        """
        task = self.celery_app.tasks.get(row.task_name)
        if task is None:
            PUBLISH_FAILURES.labels(reason="row").inc()
            result.failures.append(
                (row, f"task {row.task_name!r} is not registered with the relay's app")
            )
            return None
        options = from_wire(row.options)
        # Lets the worker record the task's lifecycle on this row by key (outbox.lifecycle).
        headers = options["headers"] = {**(options.get("headers") or {}), ROW_ID_HEADER: row.id}
        try:
            with publishing_context(headers):
                task.apply_async(
                    args=from_wire(row.args),
                    kwargs=from_wire(row.kwargs),
                    task_id=str(row.task_id),
                    producer=producer,
                    # No publish retries: a row that is not published stays pending and
                    # the next run tries again, while retrying here would stall the batch.
                    retry=False,
                    **options,
                )
        except broker_errors as e:
            raise _BrokerDownError from e
        except Exception as e:
            logger.exception("publishing outbox row %s (%s) failed", row.id, row.task_id)
            PUBLISH_FAILURES.labels(reason="row").inc()
            result.failures.append((row, f"{type(e).__name__}: {e}"))
            return None
        return task

    def _broker_down(self, error: BaseException | None) -> None:
        reason = f"{type(error).__name__}: {error}"
        if self._outage_started is None:
            self._outage_started = time.monotonic()
            logger.warning(
                "broker unavailable, rows stay pending and are retried on the next run: %s",
                reason,
            )
        else:
            logger.debug("broker still unavailable: %s", reason)

    def _broker_up(self) -> None:
        if self._outage_started is not None:
            logger.warning(
                "broker reachable again after %.1fs", time.monotonic() - self._outage_started
            )
            self._outage_started = None

    def _record_failure(self, conn: Connection, row: _Claimed, error: str, now: datetime) -> bool:
        """Reschedule a row whose publish failed on its own; return whether it is now dead."""
        attempts = row.attempts + 1
        is_dead = attempts >= self.settings.max_attempts
        conn.execute(
            update(outbox_table)
            .where(_t.id == row.id)
            .values(
                attempts=attempts,
                last_error=error[:2000],
                available_at=now + timedelta(seconds=self._backoff(attempts)),
                status=OutboxStatus.DEAD if is_dead else OutboxStatus.PENDING,
            )
        )
        return is_dead

    def _backoff(self, attempts: int) -> float:
        """Exponential backoff with jitter (half to all of the step), so rows that failed
        together spread out."""
        ceiling = min(
            self.settings.retry_backoff_max, self.settings.retry_backoff * 2 ** (attempts - 1)
        )
        return random.uniform(ceiling / 2, ceiling)  # noqa: S311 - jitter, not security
