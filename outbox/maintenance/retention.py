"""Keeping the outbox small: delete old rows in bounded batches.

Each batch is its own short transaction, so a purge of millions of rows never holds a
long lock, never bloats one transaction, and can be interrupted at any point.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import datetime

from sqlalchemy import Delete, delete, exists, select
from sqlalchemy.engine import Engine

from outbox.data import store_for
from outbox.data.schema import OutboxStatus, ProcessedMessage, keys_table, outbox_table

_t = outbox_table.c

DEFAULT_PURGE_BATCH = 1000


def purge_outbox(
    engine: Engine,
    older_than: datetime,
    *,
    statuses: Iterable[OutboxStatus] = (OutboxStatus.DISPATCHED,),
    batch_size: int = DEFAULT_PURGE_BATCH,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Delete rows in ``statuses`` older than ``older_than``; return how many.

    A dispatched row ages from ``dispatched_at``, any other from ``created_at``; both are
    read through a partial index of their status (``ix_celery_outbox_dispatched_at``,
    ``ix_celery_outbox_dead``). Dispatched rows still awaiting their consumer's
    confirmation are kept.
    """
    store = store_for(engine)
    total = 0
    for status in statuses:
        if status == OutboxStatus.DISPATCHED:
            since = _t.dispatched_at
            which = (_t.status == status) & (since < older_than) & _t.confirm_deadline.is_(None)
        else:
            since = _t.created_at
            which = (_t.status == status) & (since < older_than)
        doomed = select(_t.id).where(which).order_by(since).limit(batch_size)
        statement = delete(outbox_table).where(store.among(_t.id, doomed))
        total += _delete_in_batches(engine, statement, progress)
    return total


def purge_processed(
    engine: Engine,
    older_than: datetime,
    *,
    batch_size: int = DEFAULT_PURGE_BATCH,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Forget processed task ids recorded before ``older_than``; return how many.

    Keep them longer than any redelivery can take (the broker's visibility timeout and
    ``OUTBOX_CONFIRM_TIMEOUT``): a forgotten id would be applied again if redelivered.
    """
    doomed = (
        select(ProcessedMessage.task_id)
        .where(ProcessedMessage.processed_at < older_than)
        .limit(batch_size)
    )
    processed = ProcessedMessage.__table__.c
    statement = delete(ProcessedMessage).where(store_for(engine).among(processed.task_id, doomed))
    return _delete_in_batches(engine, statement, progress)


def purge_idle_keys(
    engine: Engine,
    older_than: datetime,
    *,
    batch_size: int = DEFAULT_PURGE_BATCH,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Forget ordering keys whose every task finished before ``older_than`` and whose
    rows are all gone; return how many. A key used again later starts a new line from 1,
    which is all it needs: nothing of it is left waiting (``outbox.ordering.keys``). A key with
    a row still kept (a dead one, or one not yet purged) is remembered, so that its
    numbers are never handed out twice."""
    k = keys_table.c
    idle = (k.head_seq.is_(None), ~exists().where(_t.ordering_key == k.key))
    doomed = (
        select(k.key)
        .where(*idle, k.updated_at < older_than)
        .order_by(k.updated_at)
        .limit(batch_size)
    )
    # The condition again on the row itself: a key taken again meanwhile is kept.
    statement = delete(keys_table).where(store_for(engine).among(k.key, doomed), *idle)
    return _delete_in_batches(engine, statement, progress)


def _delete_in_batches(
    engine: Engine, statement: Delete, progress: Callable[[int], None] | None
) -> int:
    total = 0
    while True:
        with engine.begin() as conn:
            deleted = int(conn.execute(statement).rowcount)
        total += deleted
        if progress is not None and deleted:
            progress(deleted)
        if not deleted:
            return total
