"""The store seam: everything that differs between the databases the outbox runs on.

The rest of the library asks the :class:`Store` for the few statements that cannot be
written once for every database (how a claim locks, how a processed id is compared with
a UUID column, how an argument search or a row estimate is written, what an upsert
looks like) and never branches on the dialect's name itself. Adding a database means
adding one module here and naming it in :func:`store_for`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from sqlalchemy import ColumnElement, Table, Update
from sqlalchemy.engine import Connection, Dialect, Engine
from sqlalchemy.sql.dml import Insert

from outbox.errors import UnsupportedDatabaseError


class Store(ABC):
    """One database's way of running the outbox's statements."""

    #: SQLAlchemy's name for the dialect (``postgresql``, ``sqlite``).
    name: ClassVar[str]
    #: The channel committed enqueues notify on (LISTEN/NOTIFY), or ``None`` where the
    #: database cannot wake a listener and the relay polls.
    notify_channel: ClassVar[str | None] = None

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
    def upsert(self, table: Table, values: Mapping[str, Any], key: Sequence[str]) -> Insert:
        """INSERT ``values``, or UPDATE the other columns of the row with the same ``key``."""

    def relaxed_durability(self, statement: Update) -> Update:
        """``statement`` for bookkeeping whose loss in a database crash is acceptable."""
        return statement


def store_for(bind: Engine | Connection | Dialect) -> Store:
    """The store for ``bind``'s database; refuses a database the outbox does not support."""
    dialect = bind if isinstance(bind, Dialect) else bind.dialect
    if dialect.name == "postgresql":
        from outbox.stores.postgresql import PostgresStore

        return PostgresStore()
    if dialect.name == "sqlite":
        from outbox.stores.sqlite import SqliteStore

        return SqliteStore()
    raise UnsupportedDatabaseError(
        f"celery-outbox does not support the {dialect.name!r} database: its claim, "
        "confirmation and search statements are written for PostgreSQL and SQLite. "
        "Keep the outbox's tables in one of those."
    )


__all__ = ["Store", "store_for"]
