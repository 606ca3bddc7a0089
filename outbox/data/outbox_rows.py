"""Statements on ``celery_outbox`` rows as the relays claim and publish them.

The first part of the one data layer: the relays decide (which rows were delivered,
which failure is the row's, how long a row waits before its next try) and these
statements read and write the rows. Both relays use them: the batch relay, which claims
rows and holds them locked, and the change-data-capture stream, which holds no lock and
so marks a row only while it is still pending (a polling relay may have taken it
meanwhile).

Rows are selected by status and due time, never by "ids above the last one seen": ids
are assigned at INSERT but become visible at COMMIT, so a high-water mark would skip a
row whose transaction committed after a later one.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Select, Text, and_, bindparam, case, cast, select, update
from sqlalchemy.engine import Connection

from outbox.data.schema import OutboxStatus, outbox_table

_t = outbox_table.c


@dataclass(frozen=True, slots=True)
class ClaimedRow:
    """A claimed row: what publishing it takes, and what recording a failure takes."""

    id: int
    task_id: uuid.UUID
    task_name: str
    #: The stored JSON of the task's arguments and options, as text.
    args: str
    kwargs: str
    options: str
    attempts: int
    available_at: datetime
    ordering_key: str | None = None
    ordering_seq: int | None = None


#: What the claim reads: the fields of ``ClaimedRow``, in their order, so each row builds
#: one positionally. The JSON columns are read as text: the publisher parses them once,
#: where the driver would parse them for nothing first.
_JSON_FIELDS = {"args", "kwargs", "options"}
_CLAIM_COLUMNS = tuple(
    cast(_t[field.name], Text).label(field.name) if field.name in _JSON_FIELDS else _t[field.name]
    for field in fields(ClaimedRow)
)
_now = bindparam("now", type_=_t.available_at.type)
_due = and_(_t.status == OutboxStatus.PENDING, _t.available_at <= _now)

#: Rows a running CDC relay streams (``outbox.relays.cdc``): enqueued due at once, with
#: no ordering key, never failed, and younger than ``cdc_grace`` by the database's clock
#: (the hand-over rule, in that module's docstring). Polling leaves them.
STREAMED: ColumnElement[bool] = and_(
    _t.ordering_key.is_(None),
    _t.attempts == 0,
    _t.available_at <= _t.created_at,
    _t.created_at > bindparam("streamed_after", type_=_t.created_at.type),
)
#: Whether a row is due (parameter ``now``): the first entry of the pending rows' index.
DUE_ROW = select(_t.id).where(_due).limit(1)
#: Whether a row is due that a CDC relay does not stream (``now``, ``streamed_after``).
DUE_UNSTREAMED_ROW = DUE_ROW.where(~STREAMED)


def claim_statement(batch_size: int, *, unstreamed: bool = False) -> Select[Any]:
    """The claim of at most ``batch_size`` due rows (parameter ``now``; with
    ``unstreamed``, also ``streamed_after``: rows a CDC relay streams are left), locked
    for the transaction, skipping rows another relay holds. Built once per relay: it is
    the statement the relay runs most."""
    statement = (
        select(*_CLAIM_COLUMNS)
        .where(_due)
        # The same order as the pending rows' index: the scan stops after a batch.
        .order_by(_t.available_at, _t.id)
        .limit(batch_size)
        .with_for_update(skip_locked=True, of=outbox_table)
    )
    return statement.where(~STREAMED) if unstreamed else statement


def claimed_rows(rows: Any) -> list[ClaimedRow]:
    """The rows a claim statement returned."""
    return [ClaimedRow(*row) for row in rows]


#: Delivered rows marked dispatched, with where they went. Only tasks whose consumer
#: records what it processed (``watched``) get a deadline for its confirmation.
_MARK = (
    update(outbox_table)
    .where(_t.id.in_(bindparam("ids", expanding=True)))
    .values(
        status=OutboxStatus.DISPATCHED,
        dispatched_at=bindparam("now", type_=_t.dispatched_at.type),
        deliveries=_t.deliveries + 1,
        published_queue=bindparam("queue", type_=_t.published_queue.type),
        published_exchange=bindparam("exchange", type_=_t.published_exchange.type),
        published_routing_key=bindparam("routing_key", type_=_t.published_routing_key.type),
        confirm_deadline=case(
            (
                _t.id.in_(bindparam("watched", expanding=True)),
                bindparam("deadline", type_=_t.confirm_deadline.type),
            ),
            else_=None,
        ),
    )
)
#: The stream's rows, marked only while still pending.
_MARK_STREAMED = _MARK.where(_t.status == OutboxStatus.PENDING)


def mark_dispatched(
    conn: Connection,
    ids: Sequence[int],
    *,
    watched: Sequence[int],
    now: datetime,
    deadline: datetime,
    queue: str | None,
    exchange: str | None,
    routing_key: str | None,
    streamed: bool = False,
) -> None:
    """Mark rows ``ids``, all published to one route, dispatched at ``now``; those in
    ``watched`` wait for their confirmation until ``deadline``. ``streamed`` rows (no
    lock held on them) only if they are still pending."""
    conn.execute(
        _MARK_STREAMED if streamed else _MARK,
        {
            "ids": list(ids),
            "watched": list(watched),
            "now": now,
            "deadline": deadline,
            "queue": queue,
            "exchange": exchange,
            "routing_key": routing_key,
        },
    )


def reschedule_failed(
    conn: Connection, row_id: int, *, attempts: int, error: str, due: datetime, dead: bool
) -> None:
    """Record a row's failed publish: its attempts, why, and when it is due again (or
    that it is ``dead``)."""
    conn.execute(
        update(outbox_table)
        .where(_t.id == row_id)
        .values(
            attempts=attempts,
            last_error=error,
            available_at=due,
            status=OutboxStatus.DEAD if dead else OutboxStatus.PENDING,
        )
    )
