"""The change-data-capture relay: the outbox's INSERTs read from PostgreSQL's write-ahead
log, in commit order, with no polling query and no claim UPDATE on the way to the broker.

A polling relay asks the table for due rows and locks them; this one is told. It holds
the outbox's logical replication slot (``outbox.cdc_slot``) on a streaming replication
connection, decodes what ``pgoutput`` sends (``outbox.pgoutput``), and publishes each
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
* **Marked off the path.** Rows become ``dispatched`` in bulk, in a thread of their own,
  after publishing; status, the dashboard, confirmation, lifecycle, retention and
  ordering read them as they read the polling relay's.
* **What polling took meanwhile.** A transaction committed longer than ``cdc_grace``
  ago (a stream resuming after the relay was down, or far behind) may hold rows a
  polling relay has published since: those are looked up before publishing (one
  indexed read a batch) and skipped unless still pending. Fresher rows cannot have been
  taken, and cost no query.
* **What it leaves to polling.** Rows enqueued with a countdown or eta (the polling path
  handles due times), with an ordering key (the key's hand-over decides when each goes),
  and rows whose publish failed (retried with backoff, then dead, as polling does). The
  relay process runs a polling loop beside the stream for these; polling relays leave
  the streamed rows alone for ``cdc_grace`` seconds while a stream runs.
* **One reader.** PostgreSQL lets one connection stream from a slot at a time: a second
  relay waits as a hot standby, trying every ``STANDBY_RETRY`` seconds, and takes over
  when the first one's connection ends.
* **No WAL pinned while idle.** Once everything received is confirmed, psycopg moves the
  confirmed position on to what the server says it has sent (its keepalives), and the
  relay asks for one every ``HEARTBEAT_INTERVAL``: a quiet outbox in a busy cluster
  lets the WAL go.
"""

from __future__ import annotations

import logging
import os
import queue
import select as selectors
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from celery import Celery
from sqlalchemy import select
from sqlalchemy.engine import Engine

from outbox.brokers import BrokerProbe, probe_for
from outbox.cdc_slot import CdcSlot
from outbox.clock import Clock, utcnow
from outbox.errors import CdcSetupError, SlotInvalidatedError
from outbox.heartbeat import Heartbeat, RelayKind
from outbox.pgoutput import Begin, Commit, Insert, Relation, Relations, decode
from outbox.publishing import ClaimedRow, publisher_for
from outbox.relay import Relay
from outbox.schema import OutboxStatus, outbox_table
from outbox.settings import OutboxSettings

logger = logging.getLogger(__name__)

_t = outbox_table.c

#: Seconds between a standby's attempts to take the slot.
STANDBY_RETRY = 0.25
#: Seconds between requests for the server's sent position while nothing streams.
HEARTBEAT_INTERVAL = 10.0
#: Seconds between the stream's heartbeats in ``celery_outbox_relays``.
BEAT_INTERVAL = 2.0
#: Seconds between status updates psycopg sends the server on its own.
STATUS_INTERVAL = 1.0
#: Longest pause after a failed publish or a lost connection; doubles from 0.1 s.
MAX_BACKOFF = 10.0
#: How long one wait for the next message lasts, so ``stop()`` is honoured promptly.
WAIT_STEP = 0.5
#: Seconds the marker gathers what the stream published before writing it: one UPDATE
#: for every row published meanwhile, however they came (one transaction each, say).
MARK_WINDOW = 0.05


@dataclass(slots=True)
class _Transaction:
    """One committed transaction's rows to publish, and where to confirm after it."""

    end_lsn: int
    commit_time: datetime
    rows: list[ClaimedRow] = field(default_factory=list)


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
        # Marks rows and records failures as a polling relay does, without claiming.
        self._rows = Relay(engine, celery_app, self.settings, probe=self.probe, clock=clock)
        self.engine = self._rows.engine
        self._clock = clock
        self._after_publish = after_publish
        # One row per process: polling leaves streamed rows alone while one is fresh, and
        # a relay that stops deletes its own (a standby beside it has none).
        self._heartbeat = Heartbeat(
            self.engine,
            self._rows.store,
            RelayKind.CDC,
            hostname=f"{socket.gethostname()}:{os.getpid()}",
        )
        self._marks = _Marker(self._rows, self._heartbeat)
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
            self._rows.close()

    def _stream(self, on_streaming: Callable[[], None] | None) -> None:
        import psycopg2
        import psycopg2.errors
        import psycopg2.extras

        conn: Any = psycopg2.connect(
            _dsn(self.engine), connection_factory=psycopg2.extras.LogicalReplicationConnection
        )
        try:
            cursor = conn.cursor()
            try:
                cursor.start_replication(
                    slot_name=self.slot.slot,
                    decode=False,
                    options={"proto_version": "1", "publication_names": self.slot.publication},
                    status_interval=STATUS_INTERVAL,
                )
            except psycopg2.errors.ObjectInUse as e:
                raise _SlotBusyError(str(e).strip()) from None
            except psycopg2.errors.ObjectNotInPrerequisiteState as e:
                if not self.slot.state().invalidated:
                    raise
                raise SlotInvalidatedError(
                    f"replication slot {self.slot.slot!r} is invalidated ({str(e).strip()}); "
                    "falling back to polling. Drop it (`outbox cdc drop-slot`) and start "
                    "the CDC relay again to stream anew."
                ) from e
            # Beaten before anything is published: from here on, polling relays leave the
            # rows this stream publishes.
            self._heartbeat.beat(self._clock())
            self.takeovers += 1
            self.standing_by.clear()
            self.streaming.set()
            self.settled.set()
            logger.info("cdc: streaming from slot %s", self.slot.slot)
            if on_streaming is not None:
                on_streaming()
            _Stream(self, conn, cursor).run()
        finally:
            self.streaming.clear()
            conn.close()

    def _taken_meanwhile(self, rows: list[ClaimedRow]) -> set[int]:
        """Of ``rows`` (of transactions older than ``cdc_grace``), those no longer
        pending: a polling relay published them while no stream ran."""
        with self.engine.connect() as conn:
            pending = set(
                conn.execute(
                    select(_t.id).where(
                        _t.id.in_([row.id for row in rows]), _t.status == OutboxStatus.PENDING
                    )
                ).scalars()
            )
        return {row.id for row in rows} - pending

    def _publish(self, rows: list[ClaimedRow]) -> tuple[set[int], bool]:
        """Publish ``rows``; the ids handled (delivered, or failed on their own and handed
        to polling), and whether the broker failed."""
        outcome = self.publisher.publish(rows)
        self._rows.note_broker(outcome.broker_error)
        handled = {row.id for row, _ in outcome.delivered}
        handled.update(row.id for row, _ in outcome.failed)
        if outcome.delivered:
            self.published += len(outcome.delivered)
            if self._after_publish is not None:
                for _ in outcome.delivered:
                    self._after_publish()
            self._marks.put(_Marks(list(outcome.delivered), [], self._clock()))
        if outcome.failed:
            self._marks.put(_Marks([], list(outcome.failed), self._clock()))
        return handled, outcome.broker_error is not None


class _SlotBusyError(Exception):
    """Another relay streams from the slot."""


class _Stream:
    """One streaming session on one replication connection."""

    def __init__(self, relay: CdcRelay, conn: Any, cursor: Any) -> None:
        self.relay = relay
        self.conn = conn
        self.cursor = cursor
        self.relations = Relations()
        self.table_oid: int | None = None
        #: The transaction being received (between its Begin and Commit).
        self.current: _Transaction | None = None
        #: Committed transactions received and not yet confirmed, in commit order.
        self.ready: list[_Transaction] = []
        #: Rows of ``ready`` already handled (a broker failure stopped a publish half-way).
        self.handled: set[int] = set()
        self.ready_rows = 0
        self.confirmed = relay.confirmed_lsn
        self.next_heartbeat = time.monotonic() + HEARTBEAT_INTERVAL
        self.next_beat = time.monotonic() + BEAT_INTERVAL
        self.backoff = 0.0

    def run(self) -> None:
        batch = self.relay.settings.batch_size
        while not self.relay.stopping:
            message = self.cursor.read_message() if self.ready_rows < batch else None
            if message is not None:
                self._handle(message.payload)
                continue
            if self.ready and not self._publish():
                self._wait_for_broker()
                continue
            self._keep_alive()
            if self.ready_rows < batch:
                selectors.select([self.conn], [], [], WAIT_STEP)

    def _handle(self, payload: bytes) -> None:
        message = decode(payload)
        if isinstance(message, Begin):
            self.current = _Transaction(0, message.commit_time)
        elif isinstance(message, Insert):
            if message.relation_oid == self.table_oid and self.current is not None:
                row = _streamed_row(self.relations.row(message.relation_oid, message.new))
                if row is not None:
                    self.current.rows.append(row)
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
        """Publish what the ready transactions hold and confirm those fully handled;
        whether the broker took everything."""
        grace = timedelta(seconds=self.relay.settings.cdc_grace)
        old = self.relay._clock() - grace
        stale = [
            row
            for txn in self.ready
            if txn.commit_time < old
            for row in txn.rows
            if row.id not in self.handled
        ]
        if stale:
            self.handled |= self.relay._taken_meanwhile(stale)
        rows = [row for txn in self.ready for row in txn.rows if row.id not in self.handled]
        broker_failed = False
        if rows:
            handled, broker_failed = self.relay._publish(rows)
            self.handled |= handled
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
        """Pause before publishing again, telling the server this client is alive
        (it would end a silent connection after ``wal_sender_timeout``)."""
        self.backoff = min(MAX_BACKOFF, max(0.1, self.backoff * 2))
        deadline = time.monotonic() + self.backoff
        while not self.relay.stopping and time.monotonic() < deadline:
            self.cursor.send_feedback()
            self.relay._stopping.wait(min(1.0, max(0.0, deadline - time.monotonic())))

    def _confirm(self, lsn: int) -> None:
        if lsn > self.confirmed:
            self.confirmed = self.relay.confirmed_lsn = lsn
            self.cursor.send_feedback(write_lsn=lsn, flush_lsn=lsn)

    def _keep_alive(self) -> None:
        now = time.monotonic()
        if now >= self.next_heartbeat:
            self.next_heartbeat = now + HEARTBEAT_INTERVAL
            self.cursor.send_feedback(reply=True)
        if now >= self.next_beat:
            self.next_beat = now + BEAT_INTERVAL
            self.relay._marks.beat()


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
    stream's heartbeat. A crash may lose a mark; the row then stays pending and a
    polling relay publishes it again after ``cdc_grace``, under the same task id."""

    def __init__(self, rows: Relay, heartbeat: Heartbeat) -> None:
        self._rows = rows
        self._heartbeat = heartbeat
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
            self._heartbeat.beat(self._rows.now())
        if not marks:
            return
        delivered = [pair for mark in marks for pair in mark.delivered]
        with self._rows.engine.begin() as conn:
            # Marked as of the last publish among them: the dispatch time and the
            # confirmation deadline move by at most MARK_WINDOW.
            self._rows.mark_dispatched(conn, delivered, marks[-1].at, streamed=True)
            for mark in marks:
                for row, error in mark.failed:
                    self._rows.record_failure(conn, row, error, mark.at)


def _dsn(engine: Engine) -> str:
    """libpq's connection string for ``engine``'s database, in UTC and ISO dates so the
    stream's text values parse as the outbox wrote them."""
    from psycopg2.extensions import make_dsn

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
    return str(make_dsn(**{k: v for k, v in params.items() if v is not None}))
