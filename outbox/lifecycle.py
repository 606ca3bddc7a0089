"""What happened to a task after the relay published it, recorded on its outbox row.

Flower shows a task while the broker and workers hold it; the outbox row shows it before
that. This closes the gap after: the worker's task signals record each run's outcome
(SUCCESS, FAILURE with its error, RETRY) on the row, so one place answers "where is the
task for order 42?" from enqueue to finish, and keeps answering after Flower has
forgotten.

The relay tags every message it publishes with its row's primary key (the
``celery_outbox_id`` header), so the worker updates that row by key and skips tasks that
did not come through the outbox without asking the database. The cost is one small
UPDATE, in autocommit, when a run ends; ``track_started`` adds a second at start, as
Celery's ``task_track_started`` does. A failing update is logged and never fails the
task: bookkeeping must not turn a successful task into a failed one.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from celery import Task
from celery.signals import task_failure, task_postrun, task_prerun, task_retry
from sqlalchemy import update
from sqlalchemy.engine import Engine

from outbox.enqueue import utcnow
from outbox.schema import outbox_table

logger = logging.getLogger(__name__)

#: The message header carrying the outbox row's id (set by the relay at publish time).
ROW_ID_HEADER = "celery_outbox_id"
#: Errors are cut to this length: a row is not a log file.
MAX_ERROR_LENGTH = 2000

_t = outbox_table.c


@dataclass(slots=True)
class _Run:
    row_id: int
    started_at: datetime
    error: str | None = None


def row_id_of(task: Task) -> int | None:  # type: ignore[type-arg]
    """The outbox row a running task was published from, or ``None`` if it was not."""
    headers = getattr(task.request, "headers", None) or {}
    value = headers.get(ROW_ID_HEADER, getattr(task.request, ROW_ID_HEADER, None))
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class LifecycleTracker:
    """Connects to Celery's task signals in a worker and records outcomes on the rows.

    ``engine`` may be a callable returning the engine, resolved at the first task: a
    prefork worker then opens its connections in the child process that uses them, never
    in the parent before the fork.
    """

    def __init__(
        self,
        engine: Engine | Callable[[], Engine],
        *,
        track_started: bool = False,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._engine_source = engine
        self._engine: Engine | None = engine if isinstance(engine, Engine) else None
        self.track_started = track_started
        self._clock = clock
        # Keyed by task id: a thread pool runs several tasks in one process at once.
        self._runs: dict[str, _Run] = {}
        self._lock = threading.Lock()
        self._connected = False

    def connect(self) -> LifecycleTracker:
        """Start recording (idempotent). Signals are process-wide, as in Celery."""
        if not self._connected:
            task_prerun.connect(self._on_prerun, weak=False)
            task_failure.connect(self._on_failure, weak=False)
            task_retry.connect(self._on_retry, weak=False)
            task_postrun.connect(self._on_postrun, weak=False)
            self._connected = True
        return self

    def disconnect(self) -> None:
        task_prerun.disconnect(self._on_prerun)
        task_failure.disconnect(self._on_failure)
        task_retry.disconnect(self._on_retry)
        task_postrun.disconnect(self._on_postrun)
        self._connected = False

    def _on_prerun(self, task_id: str, task: Task, **_: Any) -> None:  # type: ignore[type-arg]
        row_id = row_id_of(task)
        if row_id is None:
            return
        run = _Run(row_id, self._clock())
        with self._lock:
            self._runs[task_id] = run
        if self.track_started:
            self._record(run.row_id, task_state="STARTED", task_started_at=run.started_at)

    def _on_failure(self, task_id: str, exception: BaseException, **_: Any) -> None:
        self._note_error(task_id, f"{type(exception).__name__}: {exception}")

    def _on_retry(self, request: Any, reason: object, **_: Any) -> None:
        task_id = getattr(request, "id", None)
        if isinstance(task_id, str):
            error = reason if isinstance(reason, str) else f"{type(reason).__name__}: {reason}"
            self._note_error(task_id, error)

    def _note_error(self, task_id: str, error: str) -> None:
        with self._lock:
            run = self._runs.get(task_id)
            if run is not None:
                run.error = error[:MAX_ERROR_LENGTH]

    def _on_postrun(self, task_id: str, state: str | None = None, **_: Any) -> None:
        with self._lock:
            run = self._runs.pop(task_id, None)
        if run is None:
            return
        values: dict[str, Any] = {
            "task_state": (state or "UNKNOWN")[:16],
            "task_started_at": run.started_at,
            "task_finished_at": self._clock(),
            "task_runs": _t.task_runs + 1,
        }
        if run.error is not None:
            # Only replaced by a newer error: a task that succeeded on its second run still
            # shows why the first one was retried.
            values["task_error"] = run.error
        self._record(run.row_id, **values)

    def _record(self, row_id: int, **values: Any) -> None:
        try:
            engine = self._resolve_engine()
            with engine.connect() as conn:
                if conn.dialect.name == "postgresql":
                    # One round trip: the UPDATE commits itself, no BEGIN/COMMIT around it.
                    conn = conn.execution_options(isolation_level="AUTOCOMMIT")
                conn.execute(update(outbox_table).where(_t.id == row_id).values(**values))
                conn.commit()
        except Exception:
            logger.warning("could not record the lifecycle of outbox row %s", row_id, exc_info=True)

    def _resolve_engine(self) -> Engine:
        if self._engine is None:
            source = self._engine_source
            self._engine = source if isinstance(source, Engine) else source()
        return self._engine
