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
  (``outbox.consumers.lifecycle``). A retried run has not finished: its key waits for it.
- A task that fails for good, or goes dead, stops its key. With ``on_failure=block``
  (the default) the key waits for a person (``flask outbox unblock KEY --retry`` or
  ``--skip``); with ``skip``, the relay hands the key on at its next maintenance pass.

The relays' maintenance (:class:`outbox.maintenance.key_keeper.KeyKeeper`) also catches
what a worker could not write (a finished run whose hand-over failed), and blocks the
keys whose task went dead.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import (
    Table,
    delete,
    func,
    select,
    update,
)
from sqlalchemy.engine import Connection

from outbox.data import store_for
from outbox.data.schema import (
    OutboxStatus,
    ProcessedMessage,
    keys_table,
    outbox_table,
    workers_table,
)
from outbox.errors import InvalidOrderingKeyError, KeyNotBlockedError
from outbox.ordering.handover import (
    HOLDS_ITS_KEY,
    pass_on,
)

logger = logging.getLogger(__name__)

#: The longest key accepted (the key column's width).
MAX_KEY_LENGTH = 255

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


def blocked_summary(conn: Connection, now: datetime) -> tuple[int, float | None]:
    """How many keys are blocked, and for how many seconds the oldest has been."""
    count, oldest = conn.execute(
        select(func.count(), func.min(_k.blocked_at)).where(_k.blocked_at.is_not(None))
    ).one()
    age = None if oldest is None else max(0.0, (now - oldest).total_seconds())
    return int(count), age
