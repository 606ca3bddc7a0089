"""PostgreSQL: row locks with ``SKIP LOCKED``, LISTEN/NOTIFY, JSONB containment."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from sqlalchemy import ColumnElement, String, Table, Update, cast, func, or_, select, text
from sqlalchemy import type_coerce as coerce
from sqlalchemy.dialects.postgresql import JSONB, JSONPATH
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import Connection, Engine

from outbox.schema import NOTIFY_CHANNEL, SOME_RELAY_WAITING
from outbox.stores import Executor, Store

#: ``synchronous_commit = off`` for the current transaction only (``SET LOCAL``), as an
#: expression, so it travels inside the statement instead of costing a round trip.
_ASYNC_COMMIT = select(func.set_config("synchronous_commit", "off", True)).scalar_subquery()

_WAKE = select(func.pg_notify(NOTIFY_CHANNEL, "")).where(text(SOME_RELAY_WAITING))


class PostgresStore(Store):
    name: ClassVar[str] = "postgresql"
    #: The outbox table's trigger notifies here when an inserting transaction commits.
    notify_channel: ClassVar[str | None] = NOTIFY_CHANNEL

    def relay_connection(self, engine: Engine) -> Connection:
        # Row locks only protect a claim inside a real transaction: an engine configured
        # for AUTOCOMMIT would drop them before the rows are published.
        return engine.connect().execution_options(isolation_level="READ COMMITTED")

    def lock_for_claim(self, conn: Connection) -> None:
        # The claim itself locks its rows (FOR UPDATE SKIP LOCKED).
        return None

    def processed_id_matches(
        self, processed_task_id: ColumnElement[Any], outbox_task_id: ColumnElement[Any]
    ) -> ColumnElement[bool]:
        return processed_task_id == cast(outbox_task_id, String)

    def argument_matches(
        self, args: ColumnElement[Any], kwargs: ColumnElement[Any], values: Sequence[Any]
    ) -> ColumnElement[bool]:
        # JSONB containment: ``[a, b] @> [b]``. The keyword arguments' values are gathered
        # into an array first, so both sides match the same way.
        positional = coerce(args, JSONB)
        keyword_values = func.jsonb_path_query_array(kwargs, cast("$.*", JSONPATH), type_=JSONB)
        return or_(
            *(positional.contains([value]) for value in values),
            *(keyword_values.contains([value]) for value in values),
        )

    def estimated_rows(self, conn: Connection, table: Table) -> int:
        # The statistics' live-tuple count: kept current by every committing transaction
        # (reported within seconds), read in O(1) however large the table is.
        live = conn.execute(
            text("SELECT pg_stat_get_live_tuples(CAST(:table AS regclass))"),
            {"table": table.fullname},
        ).scalar_one()
        return max(0, int(live or 0))

    def insert(self, table: Table) -> Any:
        return pg_insert(table)

    def wake_relays(self, conn: Executor) -> None:
        # Delivered when the transaction commits, dropped if it rolls back, and sent only
        # while a relay waits, like the INSERT trigger's.
        conn.execute(_WAKE)

    def relaxed_durability(self, statement: Update) -> Update:
        # The commit does not wait for the WAL flush: a database crash can lose the last
        # moment's bookkeeping, never anything the application wrote.
        return statement.where(_ASYNC_COMMIT.is_not(None))
