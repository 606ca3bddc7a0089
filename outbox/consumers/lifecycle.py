"""What happened to a task after the relay published it, recorded on its outbox row.

Flower shows a task while the broker and workers hold it; the outbox row shows it before
that. This closes the gap after: the worker's task signals record each run's outcome
(SUCCESS, FAILURE with its error, RETRY) on the row, so one place answers "where is the
task for order 42?" from enqueue to finish, and keeps answering after Flower has
forgotten.

The relay tags every message it publishes with its row's primary key (the
``celery_outbox_id`` header), so the worker updates that row by key and skips tasks that
did not come through the outbox without asking the database. Each run's outcome is one
small UPDATE by key, written in batches by a background thread rather than on the task's
path; ``track_started`` adds a second, written at once when the run starts, as Celery's
``task_track_started`` does. A failing write is logged and never fails a task:
bookkeeping must not turn a successful task into a failed one.

An ordered task's start is always written at once, naming the worker process that runs
it (``task_worker``, ``node:pid``), and each process that runs outbox tasks beats in
``celery_outbox_workers`` every ``WORKER_BEAT_INTERVAL`` seconds: a key whose task was
started by a process that stopped beating (SIGKILLed, its machine gone) will never be
handed on by that run, and the relays' key keeper says so instead of letting it wait
for ever (``outbox.ordering.keys``).
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from celery import Task
from celery.exceptions import Retry
from celery.signals import (
    task_failure,
    task_postrun,
    task_prerun,
    task_retry,
    worker_process_shutdown,
    worker_shutdown,
)
from sqlalchemy import Integer, Text, Update, and_, bindparam, case, delete, func, or_, update
from sqlalchemy.engine import Connection, Engine

from outbox.clock import utcnow
from outbox.consumers.idempotency import confirms_processing
from outbox.consumers.run_outcomes import recorded_state
from outbox.data import store_for
from outbox.data.schema import outbox_table, workers_table
from outbox.ordering.handover import FINAL_STATES, Place, finish, place_of, row_of_task

logger = logging.getLogger(__name__)

#: The message header carrying the outbox row's id (set by the relay at publish time).
ROW_ID_HEADER = "celery_outbox_id"
#: Errors are cut to this length: a row is not a log file.
MAX_ERROR_LENGTH = 2000
#: Seconds between two writes of the queued outcomes.
DEFAULT_FLUSH_INTERVAL = 0.25
#: Outcomes that trigger a write before the interval is up.
MAX_BATCH = 500
#: Writes a key's hand-over is retried at before it is left to the relays' key keeper.
HAND_OVER_TRIES = 20
#: Seconds between two heartbeats of a worker process that runs outbox tasks; the key
#: keeper takes a process silent for ``outbox.maintenance.key_keeper.WORKER_GONE_AFTER`` as gone.
WORKER_BEAT_INTERVAL = 10.0

_t = outbox_table.c


@dataclass(slots=True)
class _Run:
    row_id: int
    started_at: datetime
    error: str | None = None
    #: When a retry this run asked for is due.
    retry_eta: datetime | None = None
    #: The ordering key this run holds, when its end hands the key on (tasks that are
    #: not idempotent consumers: those hand it on themselves).
    place: Place | None = None


@dataclass(frozen=True, slots=True)
class _HandOver:
    """An ordering key to hand on, because the run holding it ended."""

    place: Place
    finished_at: datetime
    error: str | None
    tries: int = 0


def row_id_of(task: Task) -> int | None:  # type: ignore[type-arg]
    """The outbox row a running task was published from, or ``None`` if it was not."""
    headers = getattr(task.request, "headers", None) or {}
    value = headers.get(ROW_ID_HEADER, getattr(task.request, ROW_ID_HEADER, None))
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class LifecycleTracker:
    """Connects to Celery's task signals in a worker and records outcomes on the rows.

    Outcomes are written off the task's path: ``task_postrun`` only queues the outcome,
    and a writer thread stores what has queued up every ``flush_interval`` seconds in one
    batched UPDATE. A solo or prefork worker then never waits on the database for
    bookkeeping, and a thousand tasks a second cost a few statements, not a thousand. The
    price is that a worker killed with SIGKILL loses its last ``flush_interval`` of
    records (a graceful shutdown flushes them).

    ``engine`` may be a callable returning the engine, resolved at the first write: a
    prefork worker then opens its connections in the child process that uses them, never
    in the parent before the fork.
    """

    def __init__(
        self,
        engine: Engine | Callable[[], Engine],
        *,
        track_started: bool = False,
        flush_interval: float = DEFAULT_FLUSH_INTERVAL,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._engine_source = engine
        self._engine: Engine | None = engine if isinstance(engine, Engine) else None
        self.track_started = track_started
        self.flush_interval = flush_interval
        self._clock = clock
        # Keyed by task id: a thread pool runs several tasks in one process at once.
        self._runs: dict[str, _Run] = {}
        self._pending: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._wake = threading.Event()
        # The writer thread and the process it was started in: a forked child starts its own.
        self._writer: threading.Thread | None = None
        self._writer_pid: int | None = None
        self._exit_flush_pid: int | None = None
        self._connected = False
        # The UPDATE for this engine's database, built at the first write.
        self._statement: Update | None = None
        # Ordering keys whose hand-over could not be written yet: retried at each flush.
        self._hand_overs: list[_HandOver] = []
        # This process as ``task_worker`` names it, once it has run an ordered task, and
        # when it last beat (monotonic seconds).
        self._worker: str | None = None
        self._beaten_at: float | None = None

    def connect(self) -> LifecycleTracker:
        """Start recording (idempotent). Signals are process-wide, as in Celery."""
        if not self._connected:
            task_prerun.connect(self._on_prerun, weak=False)
            task_failure.connect(self._on_failure, weak=False)
            task_retry.connect(self._on_retry, weak=False)
            task_postrun.connect(self._on_postrun, weak=False)
            worker_process_shutdown.connect(self._on_shutdown, weak=False)
            worker_shutdown.connect(self._on_shutdown, weak=False)
            self._connected = True
        return self

    def disconnect(self) -> None:
        """Stop recording, after writing what is queued."""
        task_prerun.disconnect(self._on_prerun)
        task_failure.disconnect(self._on_failure)
        task_retry.disconnect(self._on_retry)
        task_postrun.disconnect(self._on_postrun)
        worker_process_shutdown.disconnect(self._on_shutdown)
        worker_shutdown.disconnect(self._on_shutdown)
        self._connected = False
        self._wake.set()  # the writer thread sees it is disconnected and ends
        self.flush()

    def flush(self) -> int:
        """Write every queued outcome now; return how many outcomes were written.

        Writes are serialised: a flush at shutdown waits for the writer thread's batch in
        flight, then writes what is left, so nothing queued is lost on a graceful stop.
        """
        with self._write_lock:
            return self._flush()

    def _flush(self) -> int:
        self._write_hand_overs()
        with self._lock:
            batch, self._pending = self._pending, []
        if not batch:
            return 0
        try:
            with self._resolve_engine().connect() as conn:
                conn.execute(self._record_statement(conn), batch)
                conn.commit()
        except Exception:
            logger.warning(
                "could not record the lifecycle of %d outbox row(s) (ids %s)",
                len(batch),
                ", ".join(str(values["row_id"]) for values in batch[:10]),
                exc_info=True,
            )
            return 0
        return len(batch)

    def _record_statement(self, conn: Connection) -> Update:
        if self._statement is None:
            # A database crash may lose the last moment's records, never task data.
            self._statement = store_for(conn).relaxed_durability(_RECORD_STATEMENT)
        return self._statement

    def _on_prerun(self, task_id: str, task: Task, **_: Any) -> None:  # type: ignore[type-arg]
        row_id = row_id_of(task)
        place = place_of(task.request)
        if row_id is None:
            replaced = self._replaced_row(task)
            if replaced is None:
                return
            row_id, place = replaced
        run = _Run(row_id, self._clock())
        if not confirms_processing(task):
            run.place = place
        with self._lock:
            self._runs[task_id] = run
        if place is not None:
            # An ordered task's key waits for this run: which process runs it is written
            # at once, with that process's first heartbeat, so that the run is known
            # started before it can do anything, and its process known alive.
            self._worker = f"{getattr(task.request, 'hostname', None) or 'worker'}:{os.getpid()}"
            self._queue(
                run.row_id, "STARTED", run.started_at, None, None, None, ran=0, worker=self._worker
            )
            self._beat()
            self.flush()
            self._ensure_writer()
        elif self.track_started:
            # Written at once (opt-in, like Celery's task_track_started): the point is to
            # see the task running while it runs.
            self._queue(run.row_id, "STARTED", run.started_at, None, None, None, ran=0)
            self.flush()

    def _replaced_row(self, task: Task) -> tuple[int, Place | None] | None:  # type: ignore[type-arg]
        """The row of a replacement's run (``self.replace``): Celery publishes it under the
        replaced task's id, without the relay's headers, so it is looked up by that id.
        Other tasks not published by the outbox cost no statement."""
        if not getattr(task.request, "replaced_task_nesting", 0):
            return None
        try:
            with self._resolve_engine().connect() as conn:
                return row_of_task(conn, task.request.id)
        except Exception:
            logger.warning(
                "could not look up the outbox row of replacement %s[%s]",
                task.name,
                task.request.id,
                exc_info=True,
            )
            return None

    def _on_failure(self, task_id: str, exception: BaseException, **_: Any) -> None:
        self._note_error(task_id, f"{type(exception).__name__}: {exception}")

    def _on_retry(self, request: Any, reason: object, **_: Any) -> None:
        task_id = getattr(request, "id", None)
        if isinstance(task_id, str):
            # Celery's Retry says it all ("Retry in 5s: ConnectionError(...)").
            error = (
                str(reason)
                if isinstance(reason, str | Retry)
                else f"{type(reason).__name__}: {reason}"
            )
            self._note_error(task_id, error, retry_eta=self._retry_due(reason))

    def _retry_due(self, reason: object) -> datetime:
        """When the retry is due: Celery's ``Retry`` carries its countdown or eta."""
        when = getattr(reason, "when", None)
        if isinstance(when, datetime):
            return when if when.tzinfo is not None else when.replace(tzinfo=UTC)
        if isinstance(when, int | float) and not isinstance(when, bool):
            return self._clock() + timedelta(seconds=float(when))
        return self._clock()

    def _note_error(self, task_id: str, error: str, *, retry_eta: datetime | None = None) -> None:
        with self._lock:
            run = self._runs.get(task_id)
            if run is not None:
                run.error = error[:MAX_ERROR_LENGTH]
                run.retry_eta = retry_eta

    def _on_postrun(
        self, task_id: str, state: str | None = None, retval: object = None, **_: Any
    ) -> None:
        with self._lock:
            run = self._runs.pop(task_id, None)
        if run is None:
            return
        # A requeued or replaced run is not the task's end: the next run is.
        state = recorded_state(state or "UNKNOWN", retval)[:16]
        finished_at = self._clock()
        self._queue(run.row_id, state, run.started_at, finished_at, run.error, run.retry_eta, ran=1)
        if run.place is not None and state in FINAL_STATES:
            # Written at once, before a late acknowledgement: the key's next task waits
            # for it. What fails is retried at the next flush, and the relays' key keeper
            # finds it from the recorded state if this process dies first.
            error = None if FINAL_STATES[state] else (run.error or state)
            with self._lock:
                self._hand_overs.append(_HandOver(run.place, finished_at, error))
            self._write_hand_overs()
        self._ensure_writer()

    def _write_hand_overs(self) -> None:
        with self._lock:
            batch, self._hand_overs = self._hand_overs, []
        if not batch:
            return
        try:
            with self._resolve_engine().begin() as conn:
                for hand_over in batch:
                    finish(conn, hand_over.place, hand_over.finished_at, error=hand_over.error)
        except Exception:
            keys = ", ".join(hand_over.place.key for hand_over in batch[:10])
            retried = [replace(h, tries=h.tries + 1) for h in batch if h.tries < HAND_OVER_TRIES]
            if retried:
                logger.warning(
                    "could not hand on %d ordering key(s) (%s); retrying at the next write",
                    len(batch),
                    keys,
                    exc_info=True,
                )
            else:
                logger.error(
                    "gave up handing on %d ordering key(s) (%s): the relays hand them on "
                    "from the recorded run",
                    len(batch),
                    keys,
                    exc_info=True,
                )
            with self._lock:
                self._hand_overs[:0] = retried

    def _on_shutdown(self, **_: Any) -> None:
        self.flush()
        if self._worker is not None and self._worker_pid_is_mine():
            # A process that stops on purpose has finished its tasks: its heartbeat goes.
            try:
                with self._resolve_engine().begin() as conn:
                    conn.execute(delete(workers_table).where(workers_table.c.name == self._worker))
            except Exception:
                logger.debug("could not remove the worker's heartbeat", exc_info=True)

    def _worker_pid_is_mine(self) -> bool:
        return self._worker is not None and self._worker.endswith(f":{os.getpid()}")

    def _beat(self) -> None:
        """Write this process's heartbeat, if it runs ordered tasks and is due to."""
        if self._worker is None or not self._worker_pid_is_mine():
            return
        now = time.monotonic()
        if self._beaten_at is not None and now - self._beaten_at < WORKER_BEAT_INTERVAL:
            return
        self._beaten_at = now
        try:
            with self._resolve_engine().begin() as conn:
                values = {"name": self._worker, "last_seen_at": self._clock()}
                conn.execute(store_for(conn).upsert(workers_table, values, ["name"]))
        except Exception:
            logger.warning("could not write the worker's heartbeat", exc_info=True)

    def _queue(
        self,
        row_id: int,
        state: str,
        started_at: datetime,
        finished_at: datetime | None,
        error: str | None,
        retry_eta: datetime | None,
        *,
        ran: int,
        worker: str | None = None,
    ) -> None:
        values = {
            "row_id": row_id,
            "state": state,
            "started_at": started_at,
            "finished_at": finished_at,
            "error": error,
            "retry_eta": retry_eta,
            "ran": ran,
            "worker": worker,
        }
        with self._lock:
            self._pending.append(values)
            full = len(self._pending) >= MAX_BATCH
        if full:
            self._wake.set()

    def _writer_running(self) -> bool:
        return (
            self._writer is not None and self._writer_pid == os.getpid() and self._writer.is_alive()
        )

    def _ensure_writer(self) -> None:
        if self._writer_running():
            return
        with self._lock:
            if self._writer_running():
                return
            self._writer_pid = os.getpid()
            self._writer = threading.Thread(
                target=self._write_forever, name="outbox-lifecycle", daemon=True
            )
            self._writer.start()
            # A daemon thread dies with the interpreter: write the last records first
            # (registered once per process; a restarted writer reuses it).
            if self._exit_flush_pid != os.getpid():
                self._exit_flush_pid = os.getpid()
                atexit.register(self.flush)

    def _write_forever(self) -> None:
        while self._connected:
            self._wake.wait(self.flush_interval)
            self._wake.clear()
            self.flush()
            self._beat()

    def _resolve_engine(self) -> Engine:
        if self._engine is None:
            source = self._engine_source
            self._engine = source if isinstance(source, Engine) else source()
        return self._engine


def _record_statement() -> Update:
    """One UPDATE by primary key, run for a whole batch of outcomes (executemany).

    Writers in different worker processes commit on their own timers, so an older run's
    outcome can arrive after a newer one's (a retry that ran in another process): the
    state and times only move forward, while ``task_runs`` counts every run whatever
    the order.

    Runs are ordered by when they *started*: each later run of a task is caused during
    an earlier one (a retry or a replacement is published by the run it follows, a
    requeued or redelivered message is handed back by it), so it starts later, but it
    may well *end* first: a replacement can succeed in another process before the run
    that published it has reported ``REPLACED``. Records of one run (its start, then its
    end) share a start and are ordered by the time of the event each reports.
    """
    started_at = bindparam("started_at", type_=_t.task_started_at.type)
    event_at = func.coalesce(bindparam("finished_at", type_=_t.task_finished_at.type), started_at)
    latest = func.coalesce(_t.task_finished_at, _t.task_started_at)
    newer = or_(
        _t.task_started_at.is_(None),
        _t.task_started_at < started_at,
        and_(_t.task_started_at == started_at, latest <= event_at),
    )

    def if_newer(new: Any, column: Any) -> Any:
        return case((newer, new), else_=column)

    error = bindparam("error", type_=Text())
    worker = bindparam("worker", type_=_t.task_worker.type)
    return (
        update(outbox_table)
        .where(_t.id == bindparam("row_id"))
        .values(
            task_state=if_newer(bindparam("state", type_=_t.task_state.type), _t.task_state),
            task_started_at=if_newer(
                bindparam("started_at", type_=_t.task_started_at.type), _t.task_started_at
            ),
            task_finished_at=if_newer(
                bindparam("finished_at", type_=_t.task_finished_at.type), _t.task_finished_at
            ),
            # The newest error wins, but no error does not erase one: a task that
            # succeeded on its second run still shows why the first one was retried.
            task_error=case(
                (newer, func.coalesce(error, _t.task_error)),
                else_=func.coalesce(_t.task_error, error),
            ),
            task_runs=_t.task_runs + bindparam("ran", type_=Integer()),
            # A retry's due time belongs to the run that asked for it: the newest wins.
            task_retry_eta=if_newer(
                bindparam("retry_eta", type_=_t.task_retry_eta.type), _t.task_retry_eta
            ),
            # The process of the newest run that said which it is (an ordered start).
            task_worker=if_newer(func.coalesce(worker, _t.task_worker), _t.task_worker),
        )
    )


_RECORD_STATEMENT = _record_statement()
