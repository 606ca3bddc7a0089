"""Rows enqueued into an ORM session, inserted with one statement per flush.

An enqueue notes the row's values in ``session.info``, and a ``before_flush`` listener
inserts every row noted since the last flush with one ``INSERT`` of the columns an
enqueue sets (the store's, one round trip: ``Store.insert_rows``). The unit of work would
write every column of the table (21 of them, most NULL), return each new id and track
each object in the identity map: on the request path that is most of an enqueue's
cost, for an id nobody reads.

The rows still follow the session's rules: they are inserted at the next flush
(explicit, an autoflush before a query, the one before a savepoint, or the commit's),
and they are gone if the transaction or the savepoint they were enqueued in rolls back.
What makes the session flush at all is a pending object, so the first row noted since
a flush is also added to the session as an :class:`~outbox.data.schema.OutboxMessage`, the
*stand-in*: ``session.new`` shows it, and the listener expunges it once the rows are in,
so that the unit of work never sees it. One stand-in serves every row noted after it:
an ORM object built, added and expunged for each row was most of an enqueue's Python.

Why one stand-in is enough: a session flushes before it opens a savepoint and before it
releases one, so the rows noted since the last flush were all noted in the stand-in's
transaction or savepoint. If it rolls back, the session expunges the stand-in with it,
and the listener then drops the rows instead of inserting them; the caller's
``expunge_all()`` drops them the same way, as it drops any pending object. Sessions
that never enqueue pay one dictionary lookup per flush.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, event, inspect
from sqlalchemy.orm import Session, scoped_session

from outbox.data import store_for
from outbox.data.schema import OutboxMessage, outbox_table

#: The columns every enqueue sets, in every row, so that one executemany takes them all
#: (unordered rows carry NULL ordering columns).
COLUMNS = (
    "task_id",
    "task_name",
    "args",
    "kwargs",
    "options",
    "status",
    "attempts",
    "created_at",
    "available_at",
    "ordering_key",
    "ordering_seq",
)
#: Where a session keeps the rows noted since its last flush.
_NOTED = "celery_outbox.noted_rows"


@dataclass(slots=True)
class _Noted:
    """The rows noted since a session's last flush, and the pending object standing for
    them in the session."""

    stand_in: OutboxMessage
    rows: list[dict[str, Any]] = field(default_factory=list)

    def live(self) -> bool:
        # Expunged, with a rolled-back savepoint or transaction or by the caller: the
        # rows noted with it are dropped, as their own objects would have been.
        return inspect(self.stand_in).pending


def add_row(session: Session | scoped_session[Session], values: Mapping[str, Any]) -> None:
    """Note the row of ``values`` (the keys of :data:`COLUMNS`) in ``session``, to be
    inserted at its next flush."""
    row = _row(values)
    noted: _Noted | None = session.info.get(_NOTED)
    if noted is None or not noted.live():
        noted = session.info[_NOTED] = _Noted(OutboxMessage(**row))
        session.add(noted.stand_in)
    noted.rows.append(row)


def insert_row(connection: Connection, values: Mapping[str, Any]) -> None:
    """Insert the row of ``values`` at once, in ``connection``'s open transaction (the
    same statement the flush runs, built once)."""
    _insert(connection, [_row(values)])


def _insert(connection: Connection, rows: list[dict[str, Any]]) -> None:
    store_for(connection).insert_rows(connection, outbox_table, rows)


def _row(values: Mapping[str, Any]) -> dict[str, Any]:
    return {column: values.get(column) for column in COLUMNS}


@event.listens_for(Session, "before_flush")
def _insert_noted_rows(session: Session, _flush_context: Any, _instances: Any) -> None:
    noted: _Noted | None = session.info.pop(_NOTED, None)
    if noted is None or not noted.live():
        return
    try:
        connection = session.connection(bind_arguments={"mapper": inspect(OutboxMessage)})
        _insert(connection, noted.rows)
    except BaseException:
        # Left as they were: the flush fails with this error, and the rows are still the
        # session's to insert if the caller recovers and flushes again.
        session.info[_NOTED] = noted
        raise
    session.expunge(noted.stand_in)


@event.listens_for(Session, "after_soft_rollback")
def _forget_rolled_back_rows(session: Session, previous_transaction: Any) -> None:
    # A rollback of the whole transaction expunges every pending object: drop the notes
    # too, so that a session which enqueues and rolls back over and over does not keep
    # them. (A savepoint's rollback expunges their stand-in; the next note or flush
    # drops them.)
    if previous_transaction.parent is None:
        session.info.pop(_NOTED, None)
