"""Reviving dead rows once whatever killed them is fixed."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from datetime import datetime

from sqlalchemy import exists, or_, update
from sqlalchemy.engine import Connection

from outbox.ordering import HOLDS_ITS_KEY
from outbox.schema import OutboxStatus, keys_table, outbox_table

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
    """
    query = update(outbox_table).where(_t.status == OutboxStatus.DEAD)
    if task_name is not None:
        query = query.where(_t.task_name == task_name)
    ids, task_ids = list(ids), list(task_ids)
    if ids or task_ids:
        query = query.where(or_(_t.id.in_(ids), _t.task_id.in_(task_ids)))
    result = conn.execute(
        query.values(status=OutboxStatus.PENDING, attempts=0, available_at=now, task_state=None)
    )
    _unblock_revived_heads(conn)
    return int(result.rowcount)


def _unblock_revived_heads(conn: Connection) -> None:
    """A key stopped at a dead task that is now pending again is no longer blocked: it
    goes on when that task finishes (``outbox.ordering``)."""
    k = keys_table.c
    revived = exists().where(HOLDS_ITS_KEY, _t.status == OutboxStatus.PENDING)
    conn.execute(
        update(keys_table)
        .where(k.blocked_at.is_not(None), revived)
        .values(blocked_at=None, blocked_reason=None)
    )
