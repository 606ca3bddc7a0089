"""Rows enqueued into an ORM session, inserted with one statement per flush.

An enqueue adds an :class:`~outbox.schema.OutboxMessage` to the caller's session, so the
row follows the session's rules exactly: it is inserted at the next flush (explicit, an
autoflush before a query, the one before a savepoint, or the commit's), it is gone if the
transaction or the savepoint it was added in rolls back, and ``session.new`` shows it.

What changes is how the flush inserts it. The unit of work would write every column of
the table (21 of them, most NULL), return each new id and track each object in the
identity map: on the request path that is most of an enqueue's cost, for an id nobody
reads. So each enqueue also notes the row's values in ``session.info``; a ``before_flush``
listener takes the noted rows that are still pending in the session, inserts them all
with one ``INSERT`` of the columns an enqueue sets (the store's, one round trip:
``Store.insert_rows``), and expunges their objects, which the unit of work then never
sees.
Sessions that never enqueue pay one dictionary lookup per flush.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import Connection, event, inspect
from sqlalchemy.orm import Session, scoped_session

from outbox.schema import OutboxMessage, outbox_table
from outbox.stores import store_for

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
#: Where a session notes its enqueued rows until they are inserted.
_NOTED = "celery_outbox.noted_rows"


def add_row(session: Session | scoped_session[Session], values: Mapping[str, Any]) -> None:
    """Add the row of ``values`` (the keys of :data:`COLUMNS`) to ``session``, to be
    inserted at its next flush."""
    row = _row(values)
    message = OutboxMessage(**row)
    session.add(message)
    session.info.setdefault(_NOTED, []).append((message, row))


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
    noted: list[tuple[OutboxMessage, dict[str, Any]]] | None = session.info.pop(_NOTED, None)
    if not noted:
        return
    # A row whose object is no longer pending was rolled back with its savepoint or
    # transaction, or expunged by the caller: it is not inserted, as the ORM would not.
    pending = [(message, row) for message, row in noted if inspect(message).pending]
    if not pending:
        return
    try:
        connection = session.connection(bind_arguments={"mapper": inspect(OutboxMessage)})
        _insert(connection, [row for _, row in pending])
    except BaseException:
        # Left as they were: the flush fails with this error, and the rows are still the
        # session's to insert if the caller recovers and flushes again.
        session.info[_NOTED] = noted
        raise
    for message, _ in pending:
        session.expunge(message)


@event.listens_for(Session, "after_soft_rollback")
def _forget_rolled_back_rows(session: Session, previous_transaction: Any) -> None:
    # A rollback of the whole transaction expunges every pending object: drop the notes
    # too, so that a session which enqueues and rolls back over and over does not keep
    # them. (A savepoint's rollback leaves them; the flush skips the ones it expunged.)
    if previous_transaction.parent is None:
        session.info.pop(_NOTED, None)
