"""The key keeper: the maintenance pass over ordering keys (:mod:`outbox.ordering`).

A worker hands its key on when its task finishes; this pass catches what no worker
wrote: a finished run whose hand-over failed, a task that went dead (its key blocked),
a task whose worker process is gone while it ran (an idempotent consumer's published
again, any other's key blocked as stuck), and the blocked keys ``on_failure=skip`` hands
on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from celery import Celery
from sqlalchemy import (
    ColumnElement,
    Table,
    and_,
    bindparam,
    exists,
    or_,
    select,
    update,
)
from sqlalchemy.engine import Engine

from outbox.consumers.idempotency import confirms_processing
from outbox.data import store_for
from outbox.data.schema import (
    OutboxStatus,
    ProcessedMessage,
    keys_table,
    outbox_table,
    workers_table,
)
from outbox.errors import KeyNotBlockedError
from outbox.ordering.handover import FINAL_STATES, HOLDS_ITS_KEY, Place, finish
from outbox.ordering.keys import OnFailure, UnblockAction, unblock
from outbox.settings import DEFAULT_MAX_DELIVERIES

logger = logging.getLogger(__name__)

#: Keys examined per statement of the maintenance pass.
BATCH_KEYS = 1000
#: Busy keys whose task's run the maintenance pass looks at, each pass the next ones: a
#: backstop for hand-overs a worker could not write, so it may take a few minutes to
#: come round when thousands of keys are busy.
KEY_WINDOW = 200

#: Seconds a worker process may go without a heartbeat (it beats every
#: ``outbox.consumers.lifecycle.WORKER_BEAT_INTERVAL``) before the ordered task it started is
#: taken for one that will never finish.
WORKER_GONE_AFTER = 60.0

_t = outbox_table.c
_k = keys_table.c
_w = workers_table.c
_processed = cast(Table, ProcessedMessage.__table__).c


@dataclass(frozen=True, slots=True)
class KeyKeeperResult:
    """What one maintenance pass over the ordering keys did."""

    #: Keys handed on because their task's run was found finished.
    handed_on: int = 0
    #: Keys blocked because their task went dead or failed for good.
    blocked: int = 0
    #: Blocked keys handed on under ``on_failure=skip``.
    skipped: int = 0
    #: Of ``blocked``, keys whose task's worker process is gone while it ran.
    stuck: int = 0
    #: Idempotent consumers' tasks whose worker process went while they ran, published
    #: again.
    republished: int = 0


class KeyKeeper:
    """The relays' maintenance of ordering keys: a backstop for hand-overs a worker did not
    write, blocked keys for dead tasks, and ``on_failure=skip``.

    The tasks that hold keys are examined ``KEY_WINDOW`` at a time, a window that moves
    on at each pass, so a pass costs the same however many keys are busy.
    """

    def __init__(
        self,
        engine: Engine,
        celery_app: Celery,
        on_failure: OnFailure,
        *,
        clock: Callable[[], datetime],
        max_deliveries: int = DEFAULT_MAX_DELIVERIES,
    ) -> None:
        self.engine = engine
        self.celery_app = celery_app
        self.on_failure = on_failure
        self.max_deliveries = max_deliveries
        self._clock = clock
        #: Where the previous window of busy keys ended (its last ``head_since`` and key),
        #: or ``None`` to start from the oldest.
        self._after: tuple[datetime, str] | None = None

    def run_once(self) -> KeyKeeperResult:
        now = self._clock()
        blocked = self._block_dead_heads(now)
        handed_on, failed, stuck, republished = self._look_at_busy_keys(now)
        skipped = self._skip_blocked(now) if self.on_failure == OnFailure.SKIP else 0
        return KeyKeeperResult(
            handed_on=handed_on,
            blocked=blocked + failed + stuck,
            skipped=skipped,
            stuck=stuck,
            republished=republished,
        )

    def _block_dead_heads(self, now: datetime) -> int:
        # Read from the dead rows (their own small index), not from the keys.
        query = (
            select(_t.ordering_key, _t.ordering_seq, _t.last_error)
            .select_from(outbox_table.join(keys_table, HOLDS_ITS_KEY))
            .where(_t.status == OutboxStatus.DEAD, _k.blocked_at.is_(None))
            .limit(BATCH_KEYS)
        )
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        return sum(
            self._finish(
                Place(row.ordering_key, row.ordering_seq),
                now,
                error=f"dead: {row.last_error or 'no error recorded'}",
            )
            for row in rows
        )

    def _look_at_busy_keys(self, now: datetime) -> tuple[int, int, int, int]:
        # Busy keys in the order their task took them (``head_since``, then the key), from
        # where the last window ended: the busy-keys index, which holds no idle key on
        # PostgreSQL and SQLite, and puts them first (NULL) on MariaDB, where it holds
        # every key. A key handed on meanwhile moves ahead of the window and is seen again
        # later in the same round; none is passed over.
        busy: list[ColumnElement[bool]] = [
            _k.head_seq.is_not(None),
            _k.head_since.is_not(None),
            _k.blocked_at.is_(None),
        ]
        if self._after is not None:
            since, key = self._after
            busy.append(or_(_k.head_since > since, and_(_k.head_since == since, _k.key > key)))
        window = (
            select(_k.key, _k.head_seq, _k.head_since)
            .where(*busy)
            .order_by(_k.head_since, _k.key)
            .limit(KEY_WINDOW)
            .subquery()
        )
        w = window.c
        finished = (
            select(w.key, w.head_seq, _t.task_name, _t.task_state, _t.task_error)
            .select_from(
                window.join(
                    outbox_table, (_t.ordering_key == w.key) & (_t.ordering_seq == w.head_seq)
                )
            )
            .where(_t.status == OutboxStatus.DISPATCHED, _t.task_state.in_(list(FINAL_STATES)))
        )
        # Started by a worker process that has stopped beating: that run will never end.
        gone_since = now - timedelta(seconds=WORKER_GONE_AFTER)
        beating = exists().where(
            _w.name == _t.task_worker,
            _w.last_seen_at > bindparam("gone_since", gone_since, type_=_w.last_seen_at.type),
        )
        orphaned = (
            select(w.key, w.head_seq, _t.id, _t.task_name, _t.task_worker, _t.deliveries)
            .select_from(
                window.join(
                    outbox_table, (_t.ordering_key == w.key) & (_t.ordering_seq == w.head_seq)
                )
            )
            .where(
                _t.status == OutboxStatus.DISPATCHED,
                _t.task_state == "STARTED",
                _t.task_worker.is_not(None),
                ~beating,
            )
        )
        with self.engine.connect() as conn:
            seen = conn.execute(
                select(w.head_since, w.key).order_by(w.head_since.desc(), w.key.desc())
            ).all()
            rows = conn.execute(finished).all()
            lost = conn.execute(orphaned).all()
        self._after = (seen[0][0], seen[0][1]) if len(seen) >= KEY_WINDOW else None
        stuck, republished = self._orphaned(lost, now)
        handed_on = failed = 0
        for row in rows:
            task = self.celery_app.tasks.get(row.task_name)
            if task is not None and confirms_processing(task):
                # Its consumer hands the key on as it records the task: a failed run it
                # did not record (the database was down) is published again instead.
                continue
            succeeded = FINAL_STATES[row.task_state]
            error = None if succeeded else (row.task_error or row.task_state)
            if self._finish(Place(row.key, row.head_seq), now, error=error):
                if succeeded:
                    handed_on += 1
                else:
                    failed += 1
        if handed_on:
            logger.info("%d ordering key(s) handed on after their task finished", handed_on)
        return handed_on, failed, stuck, republished

    def _orphaned(self, rows: Sequence[Any], now: datetime) -> tuple[int, int]:
        """Keys whose task's worker process stopped beating while it ran: an idempotent
        consumer's task is published again (a repeat is safe, and its message went with
        the process unless it is acknowledged late); any other task's key is blocked as
        stuck, since running it again could repeat what it did. Returns (stuck,
        published again)."""
        stuck = republished = 0
        for row in rows:
            task = self.celery_app.tasks.get(row.task_name)
            why = (
                f"its worker process {row.task_worker} stopped beating (no heartbeat for "
                f"{WORKER_GONE_AFTER:g}s) while running it"
            )
            if task is not None and confirms_processing(task):
                if row.deliveries < self.max_deliveries:
                    republished += self._republish_orphan(row.id, row.task_worker, why, now)
                    continue
                why += f", after {row.deliveries} deliveries"
            if self._finish(Place(row.key, row.head_seq), now, error=f"stuck: {why}"):
                stuck += 1
        if stuck or republished:
            logger.warning(
                "%d ordering key(s) stuck at a task whose worker process is gone (blocked, "
                "see `outbox keys --blocked`), %d such task(s) published again",
                stuck,
                republished,
            )
        return stuck, republished

    def _republish_orphan(self, row_id: int, worker: str, why: str, now: datetime) -> int:
        with self.engine.begin() as conn:
            changed = conn.execute(
                update(outbox_table)
                .where(
                    _t.id == row_id,
                    _t.status == OutboxStatus.DISPATCHED,
                    _t.task_state == "STARTED",
                    _t.task_worker == worker,
                )
                .values(
                    status=OutboxStatus.PENDING,
                    available_at=now,
                    task_state=None,
                    last_error=f"{why}: published again",
                )
            ).rowcount
            if changed:
                store_for(conn).wake_relays(conn)
            return int(changed)

    def _skip_blocked(self, now: datetime) -> int:
        with self.engine.connect() as conn:
            keys = list(
                conn.execute(
                    select(_k.key)
                    .where(_k.blocked_at.is_not(None))
                    .order_by(_k.blocked_at)
                    .limit(BATCH_KEYS)
                ).scalars()
            )
        skipped = 0
        for key in keys:
            try:
                with self.engine.begin() as conn:
                    unblock(conn, key, UnblockAction.SKIP, now)
            except KeyNotBlockedError:
                continue  # resolved meanwhile
            except Exception:
                # One key that cannot be skipped must not keep the others blocked.
                logger.exception("could not skip blocked ordering key %r", key)
                continue
            skipped += 1
        if skipped:
            logger.warning("%d blocked ordering key(s) skipped (on_failure=skip)", skipped)
        return skipped

    def _finish(self, place: Place, now: datetime, *, error: str | None) -> bool:
        with self.engine.begin() as conn:
            return finish(conn, place, now, error=error)
