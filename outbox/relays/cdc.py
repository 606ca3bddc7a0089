"""The change-data-capture relay: the outbox's INSERTs read from PostgreSQL's write-ahead
log, in commit order, with no polling query and no claim UPDATE on the way to the broker.

A polling relay asks the table for due rows and locks them; this one is told. It holds
the outbox's logical replication slot (``outbox.postgres.slot``) on a streaming replication
connection, decodes what ``pgoutput`` sends (``outbox.postgres.pgoutput``), and publishes each
committed row with the message, task id and options the polling relay would have used,
through the same publisher (confirms on RabbitMQ, pipelines on Redis).

* **Order.** Transactions arrive in commit order, the one order PostgreSQL guarantees
  across transactions; rows within one in insertion order. They are published in that
  order.
* **Confirmation after the broker.** The slot's confirmed position moves past a
  transaction only once every task in it is on the broker (or, for a row that failed on
  its own, recorded as the polling relay records a failure). A relay killed anywhere
  streams again from there: tasks published but not yet confirmed go out again under
  their task ids, and consumers deduplicate.
* **Only the relay reports a position.** The relay speaks the replication protocol's
  CopyData messages itself, over libpq (psycopg 3's ``pq`` wrapper), and every status
  update it sends carries the position it confirmed after the broker, and nothing else:
  at each confirmation, when the server asks, and at least every ``STATUS_INTERVAL``
  from a thread of its own, whatever the stream's thread is doing (a publish to a
  broker that is down retries its connection for seconds), so the walsender does not
  end the connection after ``wal_sender_timeout`` and hand the slot to a standby.
  psycopg 2, which it used before, moved its own reported position up to a keepalive's
  whenever the last message's ``dataStart`` was at or below the last confirmation, which
  a Relation message's (0) always is: a transaction received and not yet published
  could be confirmed past, and skipped by a restart.
* **Marked off the path.** Rows become ``dispatched`` in bulk, in a thread of their own,
  after publishing; status, the dashboard, confirmation, lifecycle, retention and
  ordering read them as they read the polling relay's.
* **The hand-over rule, on the database's clock.** A row the stream can publish is the
  stream's while its ``created_at`` is less than ``cdc_grace`` behind the database's
  clock and a CDC relay's heartbeat (written with the database's time) is younger than
  ``cdc_grace``; after that it is polling's, which claims it as any row (``SKIP
  LOCKED``, marked in the same transaction). Both sides read the same clock, so the
  hosts' clocks do not matter. The stream publishes a row without looking only when
  polling cannot have had it and will not before the mark lands: in the first half of
  its grace, committed after polling can have seen this stream's first heartbeat, and
  with no gap of half the grace in its heartbeats. Every other row (a transaction that
  committed long after its enqueue, a stream resuming or far behind) it locks (``FOR
  UPDATE``: it waits for a polling relay holding one), publishes only if still pending,
  and marks in the same transaction, as polling does: a row is published by both only
  around a crash (a mark lost, then polling after the grace).
* **What it leaves to polling.** Rows enqueued with a countdown or eta (the polling path
  handles due times), with an ordering key (the key's hand-over decides when each goes),
  and rows whose publish failed (retried with backoff, then dead, as polling does). The
  relay process runs a polling loop beside the stream for these.
* **One reader.** PostgreSQL lets one connection stream from a slot at a time: a second
  relay waits as a hot standby, trying every ``STANDBY_RETRY`` seconds, and takes over
  when the first one's connection ends.
* **No WAL pinned while idle.** Once everything received is confirmed, the relay
  confirms the position the server's last keepalive says it has sent (every transaction
  before it has been received), and asks for one every ``HEARTBEAT_INTERVAL``: a quiet
  outbox in a busy cluster lets the WAL go.
"""

from __future__ import annotations

import logging
import os
import queue
import select as selectors
import socket
import struct
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from itertools import groupby
from typing import TYPE_CHECKING, Any

from celery import Celery
from sqlalchemy import func, select
from sqlalchemy.engine import Engine

from outbox.clock import Clock, utcnow
from outbox.data import store_for
from outbox.data.outbox_rows import ClaimedRow
from outbox.data.schema import OutboxStatus, outbox_table
from outbox.errors import CdcSetupError, PgoutputError, SlotInvalidatedError
from outbox.maintenance.heartbeat import Heartbeat, RelayKind
from outbox.postgres.pgoutput import PG_EPOCH, Begin, Commit, Insert, Relation, Relations, decode
from outbox.postgres.slot import CdcSlot
from outbox.relays.batch import CDC_CHECK_INTERVAL
from outbox.relays.outcomes import PublishOutcomes
from outbox.settings import OutboxSettings
from outbox.transports import BrokerProbe, probe_for, publisher_for

if TYPE_CHECKING:
    from psycopg.pq.abc import PGconn

logger = logging.getLogger(__name__)

_t = outbox_table.c

#: Seconds between a standby's attempts to take the slot.
STANDBY_RETRY = 0.25
#: Seconds between requests for the server's sent position while nothing streams.
HEARTBEAT_INTERVAL = 10.0
#: Seconds between the stream's heartbeats in ``celery_outbox_relays``.
BEAT_INTERVAL = 2.0
#: Longest pause between two status updates to the server, whatever the relay is doing
#: (a walsender ends a connection silent for ``wal_sender_timeout``, 60 s by default).
STATUS_INTERVAL = 1.0
#: Seconds a replication connection may take to open.
CONNECT_TIMEOUT = 10.0
#: Longest pause after a failed publish or a lost connection; doubles from 0.1 s.
MAX_BACKOFF = 10.0
#: How long one wait for the next message lasts, so ``stop()`` is honoured promptly.
WAIT_STEP = 0.5
#: Seconds the marker gathers what the stream published before writing it: one UPDATE
#: for every row published meanwhile, however they came (one transaction each, say).
MARK_WINDOW = 0.05
#: After the stream's first heartbeat (or its first after a gap), how long polling
#: relays may still go by what they saw before it: their check, cached for
#: ``CDC_CHECK_INTERVAL``, and as long again for the claim that follows.
POLLING_SEES_BEAT = timedelta(seconds=2 * CDC_CHECK_INTERVAL)

#: The database's clock, as the hand-over rule reads it (see the module's docstring).
_DATABASE_NOW = select(func.statement_timestamp())


@dataclass(slots=True)
class _Transaction:
    """One committed transaction's rows to publish, and where to confirm after it."""

    end_lsn: int
    commit_time: datetime
    rows: list[ClaimedRow] = field(default_factory=list)
    #: Each row's ``created_at``, by id: the hand-over rule's measure of its age.
    created_at: dict[int, datetime] = field(default_factory=dict)


class _DatabaseClock:
    """The database's clock, read now and then (each heartbeat) and carried forward in
    between by this process's monotonic clock: the hand-over rule's one clock."""

    def __init__(self) -> None:
        # Until the first read (the stream reads before it publishes): no time at all.
        self._read = (datetime.min.replace(tzinfo=PG_EPOCH.tzinfo), time.monotonic())

    def read(self, engine: Engine) -> datetime:
        with engine.connect() as conn:
            now: datetime = conn.execute(_DATABASE_NOW).scalar_one()
        self._read = (now, time.monotonic())
        return now

    def now(self) -> datetime:
        at, monotonic = self._read
        return at + timedelta(seconds=time.monotonic() - monotonic)


class CdcRelay:
    """Streams the outbox's INSERTs from its slot to the broker, until :meth:`stop`."""

    def __init__(
        self,
        engine: Engine,
        celery_app: Celery,
        settings: OutboxSettings | None = None,
        *,
        slot: CdcSlot | None = None,
        probe: BrokerProbe | None = None,
        clock: Clock = utcnow,
        after_publish: Callable[[], None] | None = None,
    ) -> None:
        self.settings = settings or OutboxSettings()
        self.slot = slot or CdcSlot(engine)
        self.probe = probe or probe_for(celery_app, clock=clock)
        # Its own publisher: the polling loop beside it publishes from another thread.
        self.publisher = publisher_for(celery_app, self.probe, self.settings)
        self.store = store_for(engine)
        self.engine = self.store.outbox_engine(engine)
        # Marks rows and records failures as a polling relay does, without claiming.
        self.outcomes = PublishOutcomes(self.settings)
        self._clock = clock
        self._after_publish = after_publish
        # One row per process: polling leaves streamed rows alone while one is fresh, and
        # a relay that stops deletes its own (a standby beside it has none).
        self._heartbeat = Heartbeat(
            self.engine,
            self.store,
            RelayKind.CDC,
            hostname=f"{socket.gethostname()}:{os.getpid()}",
        )
        self._database_clock = _DatabaseClock()
        # The stream's thread beats when it starts streaming, the marker's every
        # BEAT_INTERVAL.
        self._beat_lock = threading.Lock()
        #: The database's time of this stream's last heartbeat written.
        self._last_beat: datetime | None = None
        #: Rows of transactions committed before this (the database's time) are looked
        #: up: polling may have taken them while it did not see this stream's heartbeat.
        self._trusted_from: datetime | None = None
        self._marks = _Marker(self.engine, self.outcomes, self._beat)
        self._stopping = threading.Event()
        #: Set while this relay holds the slot and streams.
        self.streaming = threading.Event()
        #: Set once the slot turned out invalidated: the stream has ended for good.
        self.invalidated = threading.Event()
        #: Set while another relay holds the slot and this one waits to take it.
        self.standing_by = threading.Event()
        #: Set once this relay knows where it stands: streaming, standing by, or ended.
        self.settled = threading.Event()
        #: The position last confirmed to the server.
        self.confirmed_lsn = 0
        #: Tasks published and transactions confirmed since start.
        self.published = 0
        self.transactions = 0
        #: How often this relay took the slot (a standby counts its take-over).
        self.takeovers = 0

    def stop(self) -> None:
        self._stopping.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def run(self, on_streaming: Callable[[], None] | None = None, *, ensured: bool = False) -> None:
        """Create the slot and publication if needed (``ensured``: the caller just did),
        then stream until stopped: wait as a standby while another relay holds the slot,
        reconnect after a failure. Returns early, having logged why, if the slot is
        invalidated or cannot be made."""
        self._marks.start()
        backoff = 0.0
        setup = not ensured
        try:
            while not self.stopping:
                try:
                    if setup:
                        # Again after a failure: the slot may have been dropped meanwhile.
                        self.slot.ensure()
                        setup = False
                    self._stream(on_streaming)
                    backoff = 0.0
                except _SlotBusyError as e:
                    if not self.standing_by.is_set():
                        logger.info("cdc: standing by, %s", e)
                        self.standing_by.set()
                        self.settled.set()
                    self._stopping.wait(STANDBY_RETRY)
                    continue
                except SlotInvalidatedError as e:
                    logger.error("cdc: %s", e)  # noqa: TRY400 - the reason is the message
                    self.invalidated.set()
                    return
                except CdcSetupError as e:
                    logger.error("cdc: %s", e)  # noqa: TRY400 - the reason is the message
                    return
                except Exception as e:  # the database or broker went away: try again
                    setup = True
                    backoff = min(MAX_BACKOFF, max(0.1, backoff * 2))
                    logger.warning("cdc: stream failed, again in %.1fs: %s", backoff, e)
                    self._stopping.wait(backoff)
        finally:
            self.settled.set()
            self._marks.stop()
            try:
                # Polling takes every row again at once, not after cdc_grace.
                self._heartbeat.forget()
            except Exception as e:  # the database is away: the row goes stale instead
                logger.warning("cdc: could not remove this relay's heartbeat: %s", e)
            self.publisher.close()

    def _stream(self, on_streaming: Callable[[], None] | None) -> None:
        stream = _Replication(_dsn(self.engine))
        try:
            try:
                stream.start(self.slot.slot, self.slot.publication)
            except _ServerError as e:
                if e.sqlstate == "55006":  # object_in_use: another relay streams
                    raise _SlotBusyError(str(e)) from None
                if e.sqlstate != "55000" or not self.slot.state().invalidated:
                    raise
                raise SlotInvalidatedError(
                    f"replication slot {self.slot.slot!r} is invalidated ({e}); "
                    "falling back to polling. Drop it (`outbox cdc drop-slot`) and start "
                    "the CDC relay again to stream anew."
                ) from e
            # Beaten before anything is published: from here on, polling relays leave the
            # rows this stream publishes (those committed before, it looks up).
            with self._beat_lock:
                self._last_beat = None
            self._beat()
            self.takeovers += 1
            self.standing_by.clear()
            self.streaming.set()
            self.settled.set()
            logger.info("cdc: streaming from slot %s", self.slot.slot)
            if on_streaming is not None:
                on_streaming()
            _Stream(self, stream).run()
        finally:
            self.streaming.clear()
            stream.close()

    def _beat(self) -> None:
        """Write this stream's heartbeat with the database's time, and note it: a first
        one, or one after a gap polling may have taken for the stream's end, starts a
        time in which polling may still go by what it saw before."""
        with self._beat_lock:
            at = self._database_clock.read(self.engine)
            self._heartbeat.beat(at)
            last = self._last_beat
            if last is None or at - last > timedelta(seconds=self.settings.cdc_grace) / 2:
                self._trusted_from = at + POLLING_SEES_BEAT
            self._last_beat = at

    # -- what a streaming session asks of its relay --------------------------------

    def database_now(self) -> datetime:
        """The database's time, as last read and carried forward on this clock."""
        return self._database_clock.now()

    def pause(self, seconds: float) -> None:
        """Wait ``seconds``, or until the relay is stopped."""
        self._stopping.wait(seconds)

    def beat_soon(self) -> None:
        """Have the marker's thread write the stream's heartbeat."""
        self._marks.beat()

    def must_look_up(self, txn: _Transaction, row: ClaimedRow, now: datetime) -> bool:
        """Whether polling may have ``row``, or may take it before its mark lands: the
        hand-over rule, as of the database's time ``now``."""
        half = timedelta(seconds=self.settings.cdc_grace) / 2
        last, trusted = self._last_beat, self._trusted_from
        return (
            last is None
            or trusted is None
            or txn.commit_time < trusted
            or now - last > half
            or now - txn.created_at[row.id] > half
        )

    def publish_looked_up(self, rows: list[ClaimedRow]) -> tuple[set[int], bool]:
        """Publish those of ``rows`` still pending, holding their locks from the look-up
        to the mark, as a polling relay holds its claim; the ids handled (taken by
        polling too), and whether the broker failed."""
        ids = sorted(row.id for row in rows)
        with self.engine.begin() as conn:
            pending = set(
                conn.execute(
                    select(_t.id)
                    .where(_t.id.in_(ids), _t.status == OutboxStatus.PENDING)
                    .order_by(_t.id)
                    .with_for_update()
                ).scalars()
            )
            handled = set(ids) - pending
            todo = [row for row in rows if row.id in pending]
            if not todo:
                return handled, False
            outcome = self.publisher.publish(todo)
            self.outcomes.note_broker(outcome.broker_error)
            self._count(len(outcome.delivered))
            now = self._clock()
            self.outcomes.mark_dispatched(conn, outcome.delivered, now, streamed=True)
            for row, error in outcome.failed:
                self.outcomes.record_failure(conn, row, error, now)
        handled.update(row.id for row, _ in outcome.delivered)
        handled.update(row.id for row, _ in outcome.failed)
        return handled, outcome.broker_error is not None

    def publish_rows(self, rows: list[ClaimedRow]) -> tuple[set[int], bool]:
        """Publish ``rows``; the ids handled (delivered, or failed on their own and handed
        to polling), and whether the broker failed."""
        outcome = self.publisher.publish(rows)
        self.outcomes.note_broker(outcome.broker_error)
        handled = {row.id for row, _ in outcome.delivered}
        handled.update(row.id for row, _ in outcome.failed)
        self._count(len(outcome.delivered))
        if outcome.delivered:
            self._marks.put(_Marks(list(outcome.delivered), [], self._clock()))
        if outcome.failed:
            self._marks.put(_Marks([], list(outcome.failed), self._clock()))
        return handled, outcome.broker_error is not None

    def _count(self, delivered: int) -> None:
        self.published += delivered
        if self._after_publish is not None:
            for _ in range(delivered):
                self._after_publish()


class _SlotBusyError(Exception):
    """Another relay streams from the slot."""


class _ServerError(Exception):
    """The server refused to stream; ``sqlstate`` says why."""

    def __init__(self, sqlstate: str | None, message: str) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


class _Replication:
    """One streaming replication connection, its CopyData messages read and written
    here: XLogData (``w``) and keepalives (``k``) from the server, standby status
    updates (``r``) to it ("Streaming Replication Protocol" in PostgreSQL's manual).

    Every status update reports ``flushed``, which only :meth:`confirm` moves: no
    driver reports a position of its own."""

    def __init__(self, dsn: str) -> None:
        from psycopg import OperationalError, pq
        from psycopg.conninfo import make_conninfo

        self._pq = pq
        self._error = OperationalError
        # Connected without blocking in libpq, which would hold the GIL: the marker and
        # the polling loop beside the stream run on while a standby tries every
        # STANDBY_RETRY seconds, and while a server does not answer.
        conninfo = make_conninfo(dsn, replication="database").encode()
        self.pgconn: PGconn = pq.PGconn.connect_start(conninfo)
        deadline = time.monotonic() + CONNECT_TIMEOUT
        while (status := self.pgconn.connect_poll()) not in (
            pq.PollingStatus.OK,
            pq.PollingStatus.FAILED,
        ):
            waiting = [self.pgconn.socket]
            reading = status == pq.PollingStatus.READING
            left = deadline - time.monotonic()
            if left <= 0 or not any(
                selectors.select(waiting if reading else [], [] if reading else waiting, [], left)
            ):
                self.pgconn.finish()
                raise OperationalError(f"no replication connection within {CONNECT_TIMEOUT}s")
        if status == pq.PollingStatus.FAILED:
            message = _text(self.pgconn.error_message)
            self.pgconn.finish()
            raise OperationalError(f"cannot open a replication connection: {message}")
        #: The position reported to the server as flushed (and written).
        self.flushed = 0
        #: The furthest position a keepalive said the server has sent.
        self.server_sent = 0
        self._reported_at = time.monotonic()
        # libpq's connection is used by one thread at a time: the stream's, and the
        # reporter's (once streaming) while the stream's is busy elsewhere (publishing).
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._reporter = threading.Thread(
            target=self._keep_reporting, name="outbox-cdc-status", daemon=True
        )

    def start(self, slot: str, publication: str) -> None:
        self.pgconn.send_query(
            f"START_REPLICATION SLOT {slot} LOGICAL 0/0 "
            f"(proto_version '1', publication_names '{publication}')".encode()
        )
        while self.pgconn.is_busy():
            selectors.select([self.pgconn.socket], [], [], WAIT_STEP)
            self.pgconn.consume_input()
        result = self.pgconn.get_result()
        if result is not None and result.status == self._pq.ExecStatus.COPY_BOTH:
            self._reported_at = time.monotonic()
            self._reporter.start()
            return
        if result is None:
            raise self._error(_text(self.pgconn.error_message) or "no answer to START")
        sqlstate = result.error_field(self._pq.DiagnosticField.SQLSTATE)
        raise _ServerError(
            None if sqlstate is None else sqlstate.decode(),
            _text(result.error_message) or "the server did not start streaming",
        )

    def fileno(self) -> int:
        socket_fd: int = self.pgconn.socket
        return socket_fd

    def read(self) -> tuple[int, bytes] | None:
        """The next XLogData message (its ``dataStart`` and pgoutput payload), or
        ``None`` if no more has arrived. Keepalives are taken in passing: their position
        noted, and answered at once (with ``flushed``) when the server asks."""
        with self._lock:
            consumed = False
            while True:
                size, data = self.pgconn.get_copy_data(1)
                if size == 0:
                    if consumed:
                        return None
                    self.pgconn.consume_input()
                    consumed = True
                    continue
                if size == -1:
                    result = self.pgconn.get_result()
                    reason = _text(result.error_message) if result is not None else ""
                    raise self._error(f"the server ended the stream: {reason or 'no reason'}")
                payload = bytes(data)
                if payload[:1] == b"w":
                    data_start = struct.unpack_from("!Q", payload, 1)[0]
                    return data_start, payload[25:]
                if payload[:1] == b"k":
                    wal_end, _, reply = struct.unpack_from("!Qq?", payload, 1)
                    self.server_sent = max(self.server_sent, wal_end)
                    if reply:
                        self._report()
                    continue
                raise PgoutputError(f"replication message of unknown type {payload[:1]!r}")

    def confirm(self, lsn: int) -> None:
        """Report ``lsn`` as flushed, at once."""
        with self._lock:
            self.flushed = max(self.flushed, lsn)
            self._report()

    def report(self, *, reply: bool = False) -> None:
        """Send a status update; ``reply`` asks the server for a keepalive back."""
        with self._lock:
            self._report(reply=reply)

    def close(self) -> None:
        self._closed.set()
        if self._reporter.is_alive():
            self._reporter.join(timeout=10)
        with self._lock:
            self.pgconn.finish()

    def _report(self, *, reply: bool = False) -> None:
        """``flushed`` as written and flushed, nothing applied (the lock held)."""
        sent = int((datetime.now(PG_EPOCH.tzinfo) - PG_EPOCH) / timedelta(microseconds=1))
        status = struct.pack("!cQQQq?", b"r", self.flushed, self.flushed, 0, sent, reply)
        self.pgconn.put_copy_data(status)
        self.pgconn.flush()
        self._reported_at = time.monotonic()

    def _keep_reporting(self) -> None:
        """Report every ``STATUS_INTERVAL``, whatever the stream's thread is doing: a
        publish to a broker that is down can take longer than ``wal_sender_timeout``
        (kombu's connection retries, 12 s on Redis here), and a walsender that hears
        nothing for that long ends the connection, and a standby takes the slot."""
        while not self._closed.wait(STATUS_INTERVAL / 4):
            with self._lock:
                if self._closed.is_set():
                    return
                if time.monotonic() - self._reported_at < STATUS_INTERVAL:
                    continue
                try:
                    self._report()
                except self._error:
                    # The connection is broken: the stream's thread finds out as it reads.
                    return


def _text(message: bytes | None) -> str:
    return (message or b"").decode(errors="replace").strip()


class _Stream:
    """One streaming session on one replication connection."""

    def __init__(self, relay: CdcRelay, stream: _Replication) -> None:
        self.relay = relay
        self.stream = stream
        self.relations = Relations()
        self.table_oid: int | None = None
        #: The transaction being received (between its Begin and Commit).
        self.current: _Transaction | None = None
        #: Committed transactions received and not yet confirmed, in commit order.
        self.ready: list[_Transaction] = []
        #: Rows of ``ready`` already handled (a broker failure stopped a publish half-way).
        self.handled: set[int] = set()
        self.ready_rows = 0
        stream.flushed = self.confirmed = relay.confirmed_lsn
        self.next_heartbeat = time.monotonic() + HEARTBEAT_INTERVAL
        self.next_beat = time.monotonic() + BEAT_INTERVAL
        self.backoff = 0.0

    def run(self) -> None:
        batch = self.relay.settings.batch_size
        while not self.relay.stopping:
            message = self.stream.read() if self.ready_rows < batch else None
            if message is not None:
                self._handle(message[1])
                continue
            if self.ready and not self._publish():
                self._wait_for_broker()
                continue
            self._keep_alive()
            if self.ready_rows < batch:
                selectors.select([self.stream], [], [], WAIT_STEP)

    def _handle(self, payload: bytes) -> None:
        message = decode(payload)
        if isinstance(message, Begin):
            self.current = _Transaction(0, message.commit_time)
        elif isinstance(message, Insert):
            if message.relation_oid == self.table_oid and self.current is not None:
                values = self.relations.row(message.relation_oid, message.new)
                row = _streamed_row(values)
                if row is not None:
                    self.current.rows.append(row)
                    self.current.created_at[row.id] = datetime.fromisoformat(
                        str(values["created_at"])
                    )
        elif isinstance(message, Commit):
            if self.current is not None:
                self.current.end_lsn = message.end_lsn
                self.ready.append(self.current)
                self.ready_rows += len(self.current.rows)
                self.current = None
        elif isinstance(message, Relation):
            self.relations.add(message)
            if message.name == outbox_table.name:
                self.table_oid = message.oid

    def _publish(self) -> bool:
        """Publish what the ready transactions hold, in commit order, and confirm those
        fully handled; whether the broker took everything. Rows the hand-over rule may
        have given polling are looked up under a lock and published with it held."""
        now = self.relay.database_now()
        rows = [
            (self.relay.must_look_up(txn, row, now), row)
            for txn in self.ready
            for row in txn.rows
            if row.id not in self.handled
        ]
        broker_failed = False
        for looked_up, run in groupby(rows, key=lambda pair: pair[0]):
            publish = self.relay.publish_looked_up if looked_up else self.relay.publish_rows
            handled, broker_failed = publish([row for _, row in run])
            self.handled |= handled
            if broker_failed:
                break
        done = 0
        for txn in self.ready:
            if any(row.id not in self.handled for row in txn.rows):
                break
            done += 1
        if done:
            confirmed = self.ready[done - 1]
            for txn in self.ready[:done]:
                self.handled.difference_update(row.id for row in txn.rows)
                self.ready_rows -= len(txn.rows)
            del self.ready[:done]
            self.relay.transactions += done
            self._confirm(confirmed.end_lsn)
        if not broker_failed:
            self.backoff = 0.0
        return not broker_failed

    def _wait_for_broker(self) -> None:
        """Pause before publishing again. The server hears from this client meanwhile
        (the connection's reporter, with the position confirmed and no further): it
        would end a silent connection after ``wal_sender_timeout``, and a standby would
        take the slot and publish the same transactions."""
        self.backoff = min(MAX_BACKOFF, max(0.1, self.backoff * 2))
        self.relay.pause(self.backoff)

    def _confirm(self, lsn: int) -> None:
        if lsn > self.confirmed:
            self.confirmed = self.relay.confirmed_lsn = lsn
            self.stream.confirm(lsn)

    def _keep_alive(self) -> None:
        # Nothing received is unconfirmed: whatever the server sent before its last
        # keepalive has been read, so its position holds nothing left to publish.
        if self.current is None and not self.ready:
            self._confirm(self.stream.server_sent)
        now = time.monotonic()
        if now >= self.next_heartbeat:
            self.next_heartbeat = now + HEARTBEAT_INTERVAL
            self.stream.report(reply=True)
        if now >= self.next_beat:
            self.next_beat = now + BEAT_INTERVAL
            self.relay.beat_soon()


def _streamed_row(values: Any) -> ClaimedRow | None:
    """The row to publish, if the stream publishes it: pending, due when written, no
    ordering key (the rest is the polling path's, see the module's docstring)."""
    if values["status"] != OutboxStatus.PENDING or values["ordering_key"] is not None:
        return None
    available_at = datetime.fromisoformat(values["available_at"])
    if available_at > datetime.fromisoformat(values["created_at"]) or values["attempts"] != "0":
        return None
    return ClaimedRow(
        id=int(values["id"]),
        task_id=uuid.UUID(values["task_id"]),
        task_name=values["task_name"],
        args=values["args"],
        kwargs=values["kwargs"],
        options=values["options"],
        attempts=0,
        available_at=available_at,
    )


@dataclass(frozen=True, slots=True)
class _Marks:
    delivered: list[tuple[ClaimedRow, Any]]
    failed: list[tuple[ClaimedRow, str]]
    at: datetime


class _Marker:
    """Writes what the stream did to the table, in a thread of its own: rows delivered
    marked dispatched (in bulk), failures recorded for the polling path, and the
    stream's heartbeat (``beat``). A crash may lose a mark; the row then stays pending
    and a polling relay publishes it again after ``cdc_grace``, under the same task id."""

    def __init__(self, engine: Engine, outcomes: PublishOutcomes, beat: Callable[[], None]) -> None:
        self._engine = engine
        self._outcomes = outcomes
        self._beat = beat
        self._queue: queue.Queue[_Marks | str | None] = queue.Queue()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="outbox-cdc-marks", daemon=True)
        self._thread.start()

    def put(self, marks: _Marks) -> None:
        self._queue.put(marks)

    def beat(self) -> None:
        self._queue.put("beat")

    def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=30)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            items: list[_Marks | str | None] = [item]
            # Whatever else comes within the window goes in the same transaction.
            deadline = time.monotonic() + MARK_WINDOW
            while item is not None:
                try:
                    item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                items.append(item)
            try:
                self._write(items)
            except Exception as e:  # the rows stay pending: polling takes them after the grace
                logger.warning("cdc: could not mark %d batches: %s", len(items), e)
            if None in items:
                return

    def _write(self, items: list[_Marks | str | None]) -> None:
        marks = [item for item in items if isinstance(item, _Marks)]
        if "beat" in items:
            self._beat()
        if not marks:
            return
        delivered = [pair for mark in marks for pair in mark.delivered]
        with self._engine.begin() as conn:
            # Marked as of the last publish among them: the dispatch time and the
            # confirmation deadline move by at most MARK_WINDOW.
            self._outcomes.mark_dispatched(conn, delivered, marks[-1].at, streamed=True)
            for mark in marks:
                for row, error in mark.failed:
                    self._outcomes.record_failure(conn, row, error, mark.at)


def _dsn(engine: Engine) -> str:
    """libpq's connection string for ``engine``'s database, in UTC and ISO dates so the
    stream's text values parse as the outbox wrote them."""
    from psycopg.conninfo import make_conninfo

    url = engine.url
    params: dict[str, Any] = {
        "host": url.host,
        "port": url.port,
        "user": url.username,
        "password": url.password,
        "dbname": url.database,
        # The process, for whoever looks at pg_stat_replication to see which relay streams.
        "application_name": f"celery-outbox cdc {os.getpid()}",
        "options": "-c TimeZone=UTC -c DateStyle=ISO",
    }
    params.update({k: v for k, v in url.query.items() if isinstance(v, str)})
    return make_conninfo(**{k: v for k, v in params.items() if v is not None})
