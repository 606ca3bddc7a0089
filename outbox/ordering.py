"""Per-key ordering: tasks with the same ordering key run one at a time, in commit order.

An order's "paid", "shipped" and "delivered" notifications must reach the customer in
that order, however many workers run and whichever task is retried. Publishing them in
order is not enough: two workers run two published tasks at once, and a retried task
falls behind the next one. So the outbox publishes a key's next task only once the one
before it has **finished**, and "before" means before in the order the enqueuing
transactions **committed**:

- Enqueueing an ordered task takes the key's next sequence number from its row in
  ``celery_outbox_keys`` (:meth:`Store.next_in_line`; on PostgreSQL, for rows enqueued
  into an ORM session, the flush's INSERT does, in ``Store.insert_rows``). The row stays
  locked until the enqueuing transaction ends, so a second writer to the same key waits
  for the first to commit or roll back, and the numbers follow the commit order. Row
  ids do not: they are handed out at INSERT, and a transaction that inserted first may
  commit last. Writers to different keys never wait for each other.
- The task that holds its key is ``pending``, and published like any other: the claim
  is unchanged, and its plan too. The tasks behind it are ``held``, outside the claim's
  index, so a key with a long backlog costs the claim nothing.
- When the task holding the key finishes, :func:`finish` hands the key to the next
  held task, which becomes pending. An idempotent consumer (:func:`outbox.idempotent`)
  does this in the transaction that records its effects, so the two cannot part; for
  other tasks the worker's lifecycle tracking does it when the run ends
  (``outbox.lifecycle``). A retried run has not finished: its key waits for it.
- A task that fails for good, or goes dead, stops its key. With ``on_failure=block``
  (the default) the key waits for a person (``flask outbox unblock KEY --retry`` or
  ``--skip``); with ``skip``, the relay hands the key on at its next maintenance pass.

The relays' maintenance (:class:`KeyKeeper`) also catches what a worker could not write
(a finished run whose hand-over failed), and blocks the keys whose task went dead.
"""

from __future__ import annotations

import enum
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
    delete,
    exists,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.engine import Connection, Engine

from outbox.errors import InvalidOrderingKeyError, KeyNotBlockedError
from outbox.handover import (
    FINAL_STATES,
    HOLDS_ITS_KEY,
    Place,
    finish,
    pass_on,
)
from outbox.idempotency import confirms_processing
from outbox.schema import OutboxStatus, ProcessedMessage, keys_table, outbox_table, workers_table
from outbox.settings import DEFAULT_MAX_DELIVERIES
from outbox.stores import store_for

logger = logging.getLogger(__name__)

#: The longest key accepted (the key column's width).
MAX_KEY_LENGTH = 255
#: Keys examined per statement of the maintenance pass.
BATCH_KEYS = 1000
#: Busy keys whose task's run the maintenance pass looks at, each pass the next ones: a
#: backstop for hand-overs a worker could not write, so it may take a few minutes to
#: come round when thousands of keys are busy.
KEY_WINDOW = 200

#: Seconds a worker process may go without a heartbeat (it beats every
#: ``outbox.lifecycle.WORKER_BEAT_INTERVAL``) before the ordered task it started is
#: taken for one that will never finish.
WORKER_GONE_AFTER = 60.0

_t = outbox_table.c
_k = keys_table.c
_w = workers_table.c
_processed = cast(Table, ProcessedMessage.__table__).c


class OnFailure(enum.StrEnum):
    """What happens to a key whose task failed for good or went dead."""

    #: The key waits: every later task of it stays held until a person retries or skips.
    BLOCK = "block"
    #: The next task of the key goes.
    SKIP = "skip"


def check_key(key: object) -> str:
    """``key`` if it can be an ordering key, else :class:`~outbox.InvalidOrderingKeyError`."""
    if not isinstance(key, str):
        raise InvalidOrderingKeyError(
            f"ordering_key={key!r} is a {type(key).__name__}: pass a string naming what the "
            'tasks must stay in order for, e.g. ordering_key=f"order:{order.id}".'
        )
    if not key or len(key) > MAX_KEY_LENGTH:
        raise InvalidOrderingKeyError(
            f"ordering_key of {len(key)} characters: a key has 1 to {MAX_KEY_LENGTH}; use a "
            'short name such as "order:42".'
        )
    return key


@dataclass(frozen=True, slots=True)
class KeyState:
    """One key with a task holding it, as ``flask outbox keys`` lists it."""

    key: str
    head_seq: int
    head_since: datetime | None
    blocked_at: datetime | None
    blocked_reason: str | None
    #: The row of the task holding the key (``None`` if it was purged).
    row_id: int | None
    task_id: str | None
    task_name: str | None
    status: str | None
    #: Tasks of the key waiting behind it.
    held: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "head_seq": self.head_seq,
            "head_since": self.head_since.isoformat() if self.head_since else None,
            "blocked_at": self.blocked_at.isoformat() if self.blocked_at else None,
            "blocked_reason": self.blocked_reason,
            "row_id": self.row_id,
            "task_id": self.task_id,
            "task_name": self.task_name,
            "status": self.status,
            "held": self.held,
        }


def active_keys(
    conn: Connection, *, blocked_only: bool = False, limit: int = 100
) -> list[KeyState]:
    """Keys a task holds (only the blocked ones with ``blocked_only``), longest blocked
    or longest held first, each with its task and how many wait behind it."""
    behind = outbox_table.alias("behind")
    held = (
        select(func.count())
        .select_from(behind)
        .where(behind.c.ordering_key == _k.key, behind.c.status == OutboxStatus.HELD)
        .correlate(keys_table)
        .scalar_subquery()
    )
    query = (
        select(
            _k.key,
            _k.head_seq,
            _k.head_since,
            _k.blocked_at,
            _k.blocked_reason,
            _t.id,
            _t.task_id,
            _t.task_name,
            _t.status,
            held.label("held"),
        )
        .select_from(keys_table.outerjoin(outbox_table, HOLDS_ITS_KEY))
        .limit(limit)
    )
    if blocked_only:
        query = query.where(_k.blocked_at.is_not(None)).order_by(_k.blocked_at)
    else:
        query = query.where(_k.head_seq.is_not(None)).order_by(_k.head_since)
    return [
        KeyState(
            key=row.key,
            head_seq=row.head_seq,
            head_since=row.head_since,
            blocked_at=row.blocked_at,
            blocked_reason=row.blocked_reason,
            row_id=row.id,
            task_id=str(row.task_id) if row.task_id is not None else None,
            task_name=row.task_name,
            status=row.status,
            held=row.held,
        )
        for row in conn.execute(query)
    ]


class UnblockAction(enum.StrEnum):
    #: Publish the task holding the key again (a failed run's record is forgotten).
    RETRY = "retry"
    #: Leave that task as it is and give the key to the next one.
    SKIP = "skip"


def unblock(conn: Connection, key: str, action: UnblockAction, now: datetime) -> str:
    """Resolve a blocked key in ``conn``'s transaction; return what was done, in words.

    Raises :class:`~outbox.KeyNotBlockedError` when nothing blocks ``key``.
    """
    state = conn.execute(
        select(_k.head_seq, _k.blocked_at).where(_k.key == key).with_for_update()
    ).one_or_none()
    if state is None or state.head_seq is None:
        raise KeyNotBlockedError(
            f"ordering key {key!r} has no task waiting to run: nothing to unblock. "
            "`flask outbox keys --blocked` lists the blocked keys."
        )
    head = conn.execute(
        select(_t.id, _t.task_id, _t.status).where(
            _t.ordering_key == key, _t.ordering_seq == state.head_seq
        )
    ).one_or_none()
    if state.blocked_at is None and (head is None or head.status != OutboxStatus.DEAD):
        raise KeyNotBlockedError(
            f"ordering key {key!r} is not blocked: its task {state.head_seq} is "
            f"{head.status if head is not None else 'gone'} and the key goes on when it finishes."
        )
    if action == UnblockAction.SKIP:
        if head is not None:
            conn.execute(
                update(outbox_table)
                .where(_t.id == head.id)
                .values(last_error=func.coalesce(_t.last_error, "") + " [skipped by unblock]")
            )
        pass_on(conn, key, now)
        return f"skipped task {state.head_seq} of {key!r}; the next one goes"
    if head is None:
        raise KeyNotBlockedError(
            f"the task holding ordering key {key!r} was purged: it cannot be retried. "
            f"Skip it instead (`flask outbox unblock {key} --skip`)."
        )
    # The failed run was recorded as processed: forget it, or the consumer would skip
    # the retry as a repeat.
    conn.execute(delete(ProcessedMessage).where(_processed.task_id == str(head.task_id)))
    conn.execute(
        update(outbox_table)
        .where(_t.id == head.id)
        .values(
            status=OutboxStatus.PENDING,
            attempts=0,
            available_at=now,
            confirm_deadline=None,
            # The failed run's state must not be taken for the new run's end.
            task_state=None,
        )
    )
    conn.execute(
        update(keys_table)
        .where(_k.key == key)
        .values(blocked_at=None, blocked_reason=None, head_since=now, updated_at=now)
    )
    store_for(conn).wake_relays(conn)
    return f"task {state.head_seq} of {key!r} published again under its task id"


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


def blocked_summary(conn: Connection, now: datetime) -> tuple[int, float | None]:
    """How many keys are blocked, and for how many seconds the oldest has been."""
    count, oldest = conn.execute(
        select(func.count(), func.min(_k.blocked_at)).where(_k.blocked_at.is_not(None))
    ).one()
    age = None if oldest is None else max(0.0, (now - oldest).total_seconds())
    return int(count), age
