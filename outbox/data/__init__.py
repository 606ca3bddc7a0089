"""The store seam: everything that differs between the databases the outbox runs on.

The rest of the library asks the :class:`Store` for the few statements that cannot be
written once for every database (how a claim locks, how a processed id is compared with
a UUID column, how an argument search or a row estimate is written, what an upsert
looks like) and never branches on the dialect's name itself. Adding a database means
adding one module here and naming it in :func:`store_for`.
"""

from __future__ import annotations

from functools import cache

from sqlalchemy.engine import Dialect, Engine
from sqlalchemy.orm import Session, scoped_session

from outbox.data.base import Executor, RowUpdate, Store, key_span_rows
from outbox.errors import UnsupportedDatabaseError


def store_for(bind: Engine | Dialect | Executor) -> Store:
    """The store for ``bind``'s database; refuses a database the outbox does not support."""
    if isinstance(bind, Session | scoped_session):
        bind = bind.get_bind()
    dialect = bind if isinstance(bind, Dialect) else bind.dialect
    return store_named(dialect.name)


def store_named(database: str) -> Store:
    """The store for the database SQLAlchemy names ``database`` (a URL's backend name,
    e.g. ``postgresql`` for ``postgresql+psycopg://``), so that an application can be
    refused at start-up, before it has an engine."""
    if database == "postgresql":
        from outbox.data.postgresql import PostgresStore

        return PostgresStore()
    store = known_store(database)
    if store is None:
        raise UnsupportedDatabaseError(
            f"celery-outbox does not support the {database!r} database: its claim, "
            "confirmation and search statements are written for PostgreSQL, MariaDB/MySQL "
            "and SQLite. Keep the outbox's tables in one of those."
        )
    return store


@cache
def known_store(database: str) -> Store | None:
    """The store for ``database``, or ``None`` for a database the outbox does not
    support (so that column types can fall back to SQLAlchemy's generic ones, e.g.
    when a schema is compiled for another database)."""
    if database == "postgresql":
        from outbox.data.postgresql import PostgresStore

        return PostgresStore()
    if database == "sqlite":
        from outbox.data.sqlite import SqliteStore

        return SqliteStore()
    if database == "mariadb":  # SQLAlchemy's name for a mariadb:// URL: the same store
        return known_store("mysql")
    if database == "mysql":
        from outbox.data.mysql import MySQLStore

        return MySQLStore()
    return None


__all__ = [
    "Executor",
    "RowUpdate",
    "Store",
    "key_span_rows",
    "known_store",
    "store_for",
    "store_named",
]
