"""Reviving dead rows once whatever killed them is fixed."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from datetime import datetime

from sqlalchemy import exists, func, or_, select, update
from sqlalchemy.engine import Connection

from outbox.data import store_for
from outbox.data.schema import OutboxStatus, keys_table, outbox_table
from outbox.ordering.handover import HOLDS_ITS_KEY

_t = outbox_table.c


def retry_dead(
    conn: Connection,
    now: datetime,
    *,
    task_name: str | None = None,
    ids: Iterable[int] = (),
    task_ids: Iterable[uuid.UUID] = (),
) -> int:
    """Put dead rows back to pending, due now, with their attempts reset.

    With no filter every dead row is revived; ``task_name``, ``ids`` (row ids) and
    ``task_ids`` narrow it down. Rows keep their task id, so a consumer that already saw
    an earlier delivery still recognises it. Runs in the caller's transaction; returns
    the number of rows revived.

    A row of an ordering key that has gone past it (``on_failure=skip``, or ``unblock
    --skip``) goes to the end of its key's line: published when every task enqueued
    before the revival has finished, never beside the task running now.
    """
    dead = _t.status == OutboxStatus.DEAD
    if task_name is not None:
        dead &= _t.task_name == task_name
    ids, task_ids = list(ids), list(task_ids)
    if ids or task_ids:
        dead &= or_(_t.id.in_(ids), _t.task_id.in_(task_ids))
    in_place = or_(_t.ordering_key.is_(None), exists().where(HOLDS_ITS_KEY))
    result = conn.execute(
        update(outbox_table)
        .where(dead, in_place)
        .values(status=OutboxStatus.PENDING, attempts=0, available_at=now, task_state=None)
    )
    _unblock_revived_heads(conn)
    passed_over = conn.execute(
        select(_t.id, _t.ordering_key).where(dead, ~in_place).order_by(_t.ordering_seq)
    ).all()
    store = store_for(conn)
    for row in passed_over:
        seq, holds_key = store.next_in_line(conn, keys_table, row.ordering_key, now)
        conn.execute(
            update(outbox_table)
            .where(_t.id == row.id)
            .values(
                ordering_seq=seq,
                status=OutboxStatus.PENDING if holds_key else OutboxStatus.HELD,
                attempts=0,
                available_at=now,
                task_state=None,
                last_error=func.coalesce(_t.last_error, "")
                + f" [revived at the end of its key, place {seq}]",
            )
        )
    if passed_over:
        store.wake_relays(conn)
    return int(result.rowcount) + len(passed_over)


def _unblock_revived_heads(conn: Connection) -> None:
    """A key stopped at a dead task that is now pending again is no longer blocked: it
    goes on when that task finishes (``outbox.ordering.keys``)."""
    k = keys_table.c
    revived = exists().where(HOLDS_ITS_KEY, _t.status == OutboxStatus.PENDING)
    conn.execute(
        update(keys_table)
        .where(k.blocked_at.is_not(None), revived)
        .values(blocked_at=None, blocked_reason=None)
    )
