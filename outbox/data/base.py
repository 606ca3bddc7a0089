"""What every store answers, written once where the databases agree (see
:mod:`outbox.data` for the seam; each database's module subclasses :class:`Store`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    ColumnElement,
    DateTime,
    Table,
    Update,
    Uuid,
    bindparam,
    case,
    func,
    select,
    update,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session, scoped_session
from sqlalchemy.sql import Select
from sqlalchemy.sql.dml import Insert
from sqlalchemy.types import TypeEngine

#: What a statement can run in, inside the caller's transaction: a Core connection or an
#: ORM session.
Executor = Connection | Session | scoped_session[Session]


@dataclass(frozen=True, eq=False)
class RowUpdate:
    """An UPDATE of at most one row of ``table``: the first by ``order_by`` of the rows
    ``where`` matches. :meth:`Store.update_one` runs it and returns the row's
    ``returning`` column, which the update must leave unchanged (so that reading it
    before the update, where the database has no RETURNING, gives the same value).
    Declared once at module level: each store builds its statements at first use."""

    table: Table
    where: ColumnElement[bool]
    values: Mapping[str, Any]
    returning: ColumnElement[Any]
    order_by: ColumnElement[Any] | None = None

    def __post_init__(self) -> None:
        if getattr(self.returning, "key", None) in self.values:
            raise ValueError(f"{self.returning} is changed by the update: it cannot be returned")


class Store(ABC):
    """One database's way of running the outbox's statements."""

    #: SQLAlchemy's name for the dialect (``postgresql``, ``sqlite``).
    name: ClassVar[str]
    #: The channel committed enqueues notify on (LISTEN/NOTIFY), or ``None`` where the
    #: database cannot wake a listener and the relay polls.
    notify_channel: ClassVar[str | None] = None
    #: Where it cannot, how often a waiting relay loop asks whether a row is due (an
    #: index-only read), or ``None`` to wait for the poll interval.
    due_check_interval: ClassVar[float | None] = None
    #: Whether timestamps are stored without a time zone (as UTC): the database has no
    #: column type that keeps one.
    naive_timestamps: ClassVar[bool] = False
    #: Whether :meth:`insert_rows` takes an ordering key's next numbers itself, for rows
    #: that come without (``ordering_seq`` None), in the same statement as the INSERT: an
    #: ordered enqueue into an ORM session then runs no statement of its own.
    numbers_keys_at_flush: ClassVar[bool] = False
    #: Whether a CDC relay can stream the outbox's INSERTs from this database's log
    #: (PostgreSQL's logical decoding): elsewhere no relay asks whether one streams.
    streams_changes: ClassVar[bool] = False
    #: The column types of the outbox's timestamps and task ids here.
    timestamp_type: ClassVar[TypeEngine[Any]] = DateTime(timezone=True)
    uuid_type: ClassVar[TypeEngine[Any]] = Uuid()
    #: The statements :meth:`next_in_line` runs, by table, built at first use.
    _next_in_line_statements: ClassVar[dict[str, Insert]]
    #: The statements :meth:`update_one` runs, by update, built at first use.
    _row_updates: ClassVar[dict[RowUpdate, Update]]
    #: The statements :meth:`insert_rows` runs, by table, built at first use.
    _row_inserts: ClassVar[dict[Any, Any]]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._next_in_line_statements = {}
        cls._row_updates = {}
        cls._row_inserts = {}

    def check_server(self, conn: Connection) -> None:
        """Refuse, with :class:`~outbox.errors.UnsupportedDatabaseError`, a server too old
        for the statements this store writes."""
        return

    def outbox_engine(self, engine: Engine) -> Engine:
        """``engine`` as the relays and maintenance use it (an isolation level of their
        own, where the database's default does not suit row locks)."""
        return engine

    def relay_connection(self, engine: Engine) -> Connection:
        """A connection for one relay batch: its claim's row locks must last the batch."""
        return engine.connect()

    @abstractmethod
    def lock_for_claim(self, conn: Connection) -> None:
        """Whatever must happen in the batch's transaction before the claim's SELECT."""

    @abstractmethod
    def processed_id_matches(
        self, processed_task_id: ColumnElement[Any], outbox_task_id: ColumnElement[Any]
    ) -> ColumnElement[bool]:
        """SQL: a processed marker's text task id equals an outbox row's UUID task id."""

    @abstractmethod
    def argument_matches(
        self, args: ColumnElement[Any], kwargs: ColumnElement[Any], values: Sequence[Any]
    ) -> ColumnElement[bool]:
        """SQL: one of the row's positional arguments, or one of its keyword arguments'
        values, equals one of ``values`` (JSON values)."""

    @abstractmethod
    def estimated_rows(self, conn: Connection, table: Table) -> int:
        """About how many rows ``table`` holds, read without counting them."""

    @abstractmethod
    def insert(self, table: Table) -> Any:
        """The dialect's INSERT for ``table``, with its ``ON CONFLICT`` support."""

    def insert_rows(
        self, conn: Connection, table: Table, rows: Sequence[Mapping[str, Any]]
    ) -> None:
        """INSERT ``rows`` (dictionaries with the same keys) into ``table`` in ``conn``'s
        transaction, in as few round trips as the driver allows.

        Asking for the new ids, which nothing reads, makes SQLAlchemy send the rows as one
        multi-row statement where the dialect can return them ("insertmanyvalues");
        without it, a driver may send an executemany row by row.
        """
        statement = self._row_inserts.get(table.fullname)
        if statement is None:
            statement = self._row_inserts[table.fullname] = table.insert()
        if conn.dialect.insert_executemany_returning:
            statement = statement.returning(*table.primary_key.columns)
        conn.execute(statement, list(rows))

    def upsert(
        self,
        table: Table,
        values: Mapping[str, Any],
        key: Sequence[str],
        set_: Mapping[str, Any] | None = None,
    ) -> Insert:
        """INSERT ``values``, or UPDATE the row with the same ``key``: with ``set_``
        (expressions of the existing row's columns) when given, else with the other
        columns of ``values``."""
        statement = self.insert(table).values(dict(values))
        changed = (
            dict(set_)
            if set_ is not None
            else {name: statement.excluded[name] for name in values if name not in key}
        )
        upsert: Insert = statement.on_conflict_do_update(index_elements=list(key), set_=changed)
        return upsert

    def next_in_line(self, conn: Executor, table: Table, key: str, now: Any) -> tuple[int, bool]:
        """Take the next sequence number of ordering ``key`` in ``conn``'s transaction;
        return it, and whether the new task holds the key at once (every earlier one has
        finished).

        One statement: an upsert that increments the key's row, whose row lock the
        caller's transaction then holds until it ends, so that writers to one key get
        their numbers in the order they commit. It is built once per table and store, on
        the request path of every ordered enqueue.
        """
        statement = self._next_in_line_statements.get(table.fullname)
        if statement is None:
            statement = self._next_in_line_statements[table.fullname] = (
                self._next_in_line_statement(table)
            )
        seq, head = conn.execute(statement, {"new_key": key, "at": now}).one()
        return int(seq), head == seq

    def _next_in_line_statement(self, table: Table) -> Insert:
        c = table.c
        return self._next_in_line_upsert(table).returning(c.last_seq, c.head_seq)

    def _next_in_line_upsert(self, table: Table) -> Insert:
        """The upsert that increments ``table``'s row of a key (``new_key``, at ``at``).

        The assignments are listed so that each reads only columns assigned after it:
        where they run left to right, each seeing the ones before it (MySQL), they give
        what they give where every one reads the old row (PostgreSQL, SQLite).
        """
        c = table.c
        idle = c.head_seq.is_(None)
        now = bindparam("at", type_=c.updated_at.type)
        return self.upsert(
            table,
            {
                "key": bindparam("new_key", type_=c.key.type),
                "last_seq": 1,
                "head_seq": 1,
                "head_since": now,
                "updated_at": now,
            },
            ["key"],
            set_={
                "head_since": case((idle, now), else_=c.head_since),
                "head_seq": case((idle, c.last_seq + 1), else_=c.head_seq),
                "last_seq": c.last_seq + 1,
                "updated_at": now,
            },
        )

    def update_one(self, conn: Executor, change: RowUpdate, params: Mapping[str, Any]) -> Any:
        """Run ``change`` in ``conn``'s transaction; return its ``returning`` column, or
        ``None`` when no row matched. One statement (UPDATE … RETURNING), built once."""
        statement = self._row_updates.get(change)
        if statement is None:
            statement = self._row_updates[change] = _returning_update(change)
        return conn.execute(statement, dict(params)).scalar_one_or_none()

    def among(self, key: ColumnElement[Any], rows: Select[Any]) -> ColumnElement[bool]:
        """SQL for an UPDATE or DELETE of the table ``rows`` reads: its ``key`` is one of
        those ``rows`` selects (``DELETE FROM t WHERE id IN (SELECT id FROM t … LIMIT n)``).
        """
        return key.in_(rows)

    @abstractmethod
    def wake_relays(self, conn: Executor) -> None:
        """Wake the waiting relays when ``conn``'s transaction commits (where the database
        can; elsewhere they find the row at their next poll)."""

    def relaxed_durability(self, statement: Update) -> Update:
        """``statement`` for bookkeeping whose loss in a database crash is acceptable."""
        return statement

    def database_now(self, conn: Connection) -> datetime:
        """The database server's time (UTC, aware): one clock for relays on machines
        whose own clocks disagree. An embedded database shares the process's clock."""
        return datetime.now(UTC)


def _returning_update(change: RowUpdate) -> Update:
    where = change.where
    if change.order_by is not None:
        [pk] = change.table.primary_key.columns
        first = select(pk).where(where).order_by(change.order_by).limit(1)
        where = pk == first.scalar_subquery()
    return update(change.table).where(where).values(dict(change.values)).returning(change.returning)


def key_span_rows(conn: Connection, table: Table) -> int:
    """The span of ``table``'s integer primary key: two lookups at the ends of its
    B-tree, current at once. Ids rolled back or deleted in the middle make it an
    overestimate."""
    [key] = table.primary_key.columns
    span = conn.execute(select(func.max(key) - func.min(key) + 1)).scalar_one()
    return int(span or 0)
