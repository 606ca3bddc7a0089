"""SQLite: one writer at a time, JSON1 for argument search, polling instead of NOTIFY."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, ClassVar

from sqlalchemy import ColumnElement, Table, and_, column, exists, false, func, or_, table, update
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection

from outbox.data.base import Executor, Store, key_span_rows

#: The outbox's table as the claim's lock names it (``outbox.data.schema`` imports the stores).
_OUTBOX = table("celery_outbox", column("status"))
#: SQLite reads JSON integers outside 64 bits as reals.
_INT64 = range(-(2**63), 2**63)


class SqliteStore(Store):
    name: ClassVar[str] = "sqlite"
    # SQLite has no time zone type and hands back naive values.
    naive_timestamps: ClassVar[bool] = True

    def lock_for_claim(self, conn: Connection) -> None:
        # SQLite has no row locks: take the database write lock before reading so two
        # relays cannot claim the same rows. A write statement that matches nothing
        # takes it under any of pysqlite's transaction modes, where an explicit
        # BEGIN IMMEDIATE would clash with one the application's hooks already began.
        conn.execute(update(_OUTBOX).where(false()).values(status="pending"))

    def processed_id_matches(
        self, processed_task_id: ColumnElement[Any], outbox_task_id: ColumnElement[Any]
    ) -> ColumnElement[bool]:
        # The outbox stores a UUID as 32 hex digits here, Celery's ids are hyphenated.
        # Rebuild the hyphenated form from the hex rather than strip the hyphens from the
        # marker's, so the comparison can use the markers' primary key.
        hyphenated = (
            func.substr(outbox_task_id, 1, 8)
            + "-"
            + func.substr(outbox_task_id, 9, 4)
            + "-"
            + func.substr(outbox_task_id, 13, 4)
            + "-"
            + func.substr(outbox_task_id, 17, 4)
            + "-"
            + func.substr(outbox_task_id, 21, 12)
        )
        return processed_task_id == hyphenated

    def argument_matches(
        self, args: ColumnElement[Any], kwargs: ColumnElement[Any], values: Sequence[Any]
    ) -> ColumnElement[bool]:
        return or_(_json_contains(args, values), _json_contains(kwargs, values))

    def wake_relays(self, conn: Executor) -> None:
        # Nothing can wake a listener: the relays find the row at their next poll.
        return

    def estimated_rows(self, conn: Connection, table: Table) -> int:
        return key_span_rows(conn, table)

    def insert(self, table: Table) -> Any:
        return sqlite_insert(table)


def _json_contains(column: ColumnElement[Any], values: Sequence[Any]) -> ColumnElement[bool]:
    """SQL: ``json_each(column)`` yields one of ``values`` (an array's items, an object's
    values), comparing numbers as numbers, text as text and objects as minified JSON."""
    item = func.json_each(column).table_valued("value", "type").alias("item")
    conditions = []
    for value in values:
        if isinstance(value, str):
            conditions.append(and_(item.c.type == "text", item.c.value == value))
        elif isinstance(value, int | float):
            if isinstance(value, int) and value not in _INT64:
                value = float(value)
            conditions.append(and_(item.c.type.in_(["integer", "real"]), item.c.value == value))
        else:
            minified = json.dumps(value, separators=(",", ":"))
            conditions.append(and_(item.c.type == "object", item.c.value == func.json(minified)))
    return exists().select_from(item).where(or_(*conditions))
