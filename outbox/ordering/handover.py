"""Handing an ordering key on: the statements whoever ends a key's task runs.

An idempotent consumer (``outbox.consumers.idempotency``) hands its key on in the transaction that
records its effects; lifecycle tracking (``outbox.consumers.lifecycle``) does it as a run ends; the
relays' key keeper and ``unblock`` (``outbox.ordering.keys``) when a worker could not. All of
them find the task's place from its message (:func:`place_of`) or its row
(:func:`row_of_task`), and end it with :func:`finish`. What ordering means, and the rest
of its machinery, is in :mod:`outbox.ordering.keys`.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, func, select, update

from outbox.data import Executor, RowUpdate, store_for
from outbox.data.schema import OutboxStatus, keys_table, outbox_table

logger = logging.getLogger("outbox.ordering.keys")

_t = outbox_table.c
_k = keys_table.c

#: Message headers carrying the task's ordering key and place in it (set by the relay).
KEY_HEADER = "celery_outbox_key"
SEQ_HEADER = "celery_outbox_seq"
#: Longest reason kept on a blocked key.
MAX_REASON_LENGTH = 2000
#: Celery states after which a run is over for good, and whether it succeeded.
FINAL_STATES = {"SUCCESS": True, "IGNORED": True, "FAILURE": False, "REJECTED": False}
#: SQL, between an outbox row and a key's row: the row is the task holding that key.
HOLDS_ITS_KEY = (_t.ordering_key == _k.key) & (_t.ordering_seq == _k.head_seq)


@dataclass(frozen=True, slots=True)
class Place:
    """A task's ordering key and its sequence number in that key."""

    key: str
    seq: int


def place_of(request: Any) -> Place | None:
    """The ordering place of the task ``request`` is running, if it has one."""
    headers = getattr(request, "headers", None) or {}

    def header(name: str) -> Any:
        return headers.get(name, getattr(request, name, None))

    key, seq = header(KEY_HEADER), header(SEQ_HEADER)
    if not isinstance(key, str) or not isinstance(seq, int) or isinstance(seq, bool):
        return None
    return Place(key, seq)


def row_of_task(conn: Executor, task_id: object) -> tuple[int, Place | None] | None:
    """The outbox row a task id was enqueued as, and its ordering place: for a run whose
    message carries no headers of the relay's (a replacement, which Celery publishes
    under the replaced task's id). ``None`` when no row has that id."""
    try:
        wanted = uuid.UUID(str(task_id))
    except ValueError:  # not an id the outbox hands out
        return None
    row = conn.execute(_ROW_OF_TASK, {"wanted": wanted}).one_or_none()
    if row is None:
        return None
    key, seq = row.ordering_key, row.ordering_seq
    return int(row.id), Place(key, int(seq)) if key is not None and seq is not None else None


_ROW_OF_TASK = select(_t.id, _t.ordering_key, _t.ordering_seq).where(
    _t.task_id == bindparam("wanted", type_=_t.task_id.type)
)


def finish(conn: Executor, place: Place, now: datetime, *, error: str | None = None) -> bool:
    """Record in ``conn``'s transaction that the task at ``place`` finished: hand its key
    to the next held task, or, when it failed for good (``error``), block the key.

    Does nothing, and returns ``False``, unless that task holds the key: a repeated
    delivery, or a run the key has been taken from, changes nothing.

    Each statement changes the key's row only if this task holds it, and so locks it
    first: the writers to the key wait for this transaction, and every task enqueued
    behind this one has committed (its number is in ``last_seq``). A key with nothing
    behind its task, the common case, costs one statement.
    """
    values = {"of_key": place.key, "at_seq": place.seq, "at": now}
    if error is not None:
        blocked = conn.execute(_BLOCK, {**values, "why": error[:MAX_REASON_LENGTH]})
        if not blocked.rowcount:  # type: ignore[attr-defined]
            return False
        logger.warning(
            "ordering key %r stopped: its task %d failed: %s", place.key, place.seq, error
        )
        return True
    last_seq = store_for(conn).update_one(conn, _RELEASE, values)
    if last_seq is None:
        return False
    if last_seq > place.seq:
        pass_on(conn, place.key, now)
    return True


def pass_on(conn: Executor, key: str, now: datetime) -> None:
    """Give ``key`` (whose row this transaction has locked) to its next held task (also
    what ``unblock --skip`` does)."""
    store = store_for(conn)
    seq = store.update_one(conn, _PROMOTE, {"of_key": key})
    since = None if seq is None else now
    conn.execute(_GIVE, {"of_key": key, "at_seq": seq, "held_since": since, "at": now})
    if seq is not None:
        store.wake_relays(conn)


# The hand-over's statements, built once: they run at the end of every ordered task.
_key = bindparam("of_key", type_=_k.key.type)
_seq = bindparam("at_seq", type_=_k.head_seq.type)
_now = bindparam("at", type_=_k.updated_at.type)
_holds = (_k.key == _key) & (_k.head_seq == _seq)
_BLOCK = (
    update(keys_table)
    .where(_holds)
    .values(
        blocked_at=func.coalesce(_k.blocked_at, _now),
        blocked_reason=bindparam("why", type_=_k.blocked_reason.type),
        updated_at=_now,
    )
)
_RELEASE = RowUpdate(
    keys_table,
    where=_holds,
    values={
        "head_seq": None,
        "head_since": None,
        "blocked_at": None,
        "blocked_reason": None,
        "updated_at": _now,
    },
    returning=_k.last_seq,
)
# The key's next held task becomes pending. Its due time stays as it was: moving it to
# ``now`` would make it wait for the difference whenever this host's clock runs ahead
# of the relay's.
_PROMOTE = RowUpdate(
    outbox_table,
    where=(_t.ordering_key == _key) & (_t.status == OutboxStatus.HELD),
    order_by=_t.ordering_seq,
    values={"status": OutboxStatus.PENDING},
    returning=_t.ordering_seq,
)
_GIVE = (
    update(keys_table)
    .where(_k.key == _key)
    .values(
        head_seq=_seq,
        head_since=bindparam("held_since", type_=_k.head_since.type),
        blocked_at=None,
        blocked_reason=None,
        updated_at=_now,
    )
)
