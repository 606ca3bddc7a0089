"""Statements on ``celery_outbox`` rows as the relays record what a publish did.

The first part of the one data layer: the relays decide (which rows were delivered,
which failure is the row's, how long a row waits before its next try) and these
statements write it. Both relays use them: the batch relay, which holds each row it
claimed locked, and the change-data-capture stream, which holds no lock and so marks a
row only while it is still pending (a polling relay may have taken it meanwhile).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import bindparam, case, update
from sqlalchemy.engine import Connection

from outbox.data.schema import OutboxStatus, outbox_table

_t = outbox_table.c

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
