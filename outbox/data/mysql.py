"""MariaDB 10.6+ and MySQL 8: ``SKIP LOCKED`` under READ COMMITTED, no RETURNING, polling.

What differs from PostgreSQL, and why:

* **Isolation.** Every outbox transaction runs under READ COMMITTED. Under InnoDB's
  default REPEATABLE READ, a locking read also locks the gaps between index entries, so
  the relay's claim would block, and deadlock with, the application's concurrent
  INSERTs into the same index range.
* **No partial indexes.** The claim and the other lookups use composite indexes led by
  the column their condition tests (``(status, available_at, id)`` for the claim), which
  the schema declares for this database family (``outbox.data.schema``).
* **Types.** Timestamps are ``DATETIME(6)`` holding UTC (``DATETIME`` alone would drop
  the microseconds, and with them the order of rows written in the same second); task
  ids are ``CHAR(32)`` hex whatever the URL's scheme (``mariadb://`` would otherwise
  pick MariaDB's native UUID type, so the same database would get a different table).
* **No UPDATE … RETURNING** (MariaDB has it for INSERT and DELETE only; MySQL has none).
  A one-row update locks its row with ``SELECT … FOR UPDATE`` first and reads the value
  there; an upsert is followed by a read of the row it locked.
* **No LISTEN/NOTIFY.** A waiting relay loop checks every ``due_check_interval`` whether a
  row is due (``relay_loop``): an index-only read of the pending rows' index, without a
  lock, that finds nothing in a few hundred microseconds when the outbox is idle.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    ColumnElement,
    Select,
    Table,
    Update,
    bindparam,
    case,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.dialects.mysql import DATETIME
from sqlalchemy.dialects.mysql import insert as mysql_insert
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.dml import Insert
from sqlalchemy.types import Boolean, TypeEngine, Uuid

from outbox.data.base import Executor, RowUpdate, Store, key_span_rows
from outbox.errors import UnsupportedDatabaseError

#: The oldest servers with ``SKIP LOCKED`` and ``JSON_TABLE``.
MINIMUM_MARIADB = (10, 6)
MINIMUM_MYSQL = (8, 0, 4)


class MySQLStore(Store):
    name: ClassVar[str] = "mysql"
    naive_timestamps: ClassVar[bool] = True
    #: No LISTEN/NOTIFY: a waiting relay loop checks for a due row this often. The check
    #: reads the first entry of the pending rows' index (a few hundred microseconds, no
    #: lock); a commit waits half of it on average before its relay drains.
    due_check_interval: ClassVar[float | None] = 0.02
    timestamp_type: ClassVar[TypeEngine[Any]] = DATETIME(fsp=6)
    uuid_type: ClassVar[TypeEngine[Any]] = Uuid(native_uuid=False)
    #: The statements :meth:`update_one` runs, by update, built at first use.
    _row_update_pairs: ClassVar[dict[RowUpdate, tuple[Select[Any], Update]]] = {}
    #: The UPDATE :meth:`next_in_line` tries first, by table.
    _next_in_line_updates: ClassVar[dict[str, Update]] = {}

    def check_server(self, conn: Connection) -> None:
        dialect: Any = conn.dialect
        version = tuple(dialect.server_version_info or ())
        if dialect.is_mariadb:
            if version < MINIMUM_MARIADB:
                raise UnsupportedDatabaseError(
                    f"MariaDB {_dotted(version)} is too old for celery-outbox: its claim needs "
                    f"SKIP LOCKED and its search JSON_TABLE, from MariaDB "
                    f"{_dotted(MINIMUM_MARIADB)}. Upgrade the server."
                )
        elif version < MINIMUM_MYSQL:
            raise UnsupportedDatabaseError(
                f"MySQL {_dotted(version)} is too old for celery-outbox: its claim needs "
                f"SKIP LOCKED and its search JSON_TABLE, from MySQL {_dotted(MINIMUM_MYSQL)}. "
                "Upgrade the server."
            )

    def outbox_engine(self, engine: Engine) -> Engine:
        # Isolation as an execution option costs a SET at every connection checkout and
        # another at its return; an engine created with READ COMMITTED (the example's)
        # has it on every connection already and needs neither.
        if _read_committed(engine):
            return engine
        return engine.execution_options(isolation_level="READ COMMITTED")

    def relay_connection(self, engine: Engine) -> Connection:
        return self.outbox_engine(engine).connect()

    def lock_for_claim(self, conn: Connection) -> None:
        # The claim itself locks its rows (FOR UPDATE SKIP LOCKED).
        return None

    def processed_id_matches(
        self, processed_task_id: ColumnElement[Any], outbox_task_id: ColumnElement[Any]
    ) -> ColumnElement[bool]:
        # The outbox stores 32 hex digits, Celery's ids are hyphenated. Rebuild the
        # hyphenated form from the hex rather than strip the marker's hyphens, so the
        # comparison can use the markers' primary key.
        return processed_task_id == func.concat_ws(
            "-",
            func.substr(outbox_task_id, 1, 8),
            func.substr(outbox_task_id, 9, 4),
            func.substr(outbox_task_id, 13, 4),
            func.substr(outbox_task_id, 17, 4),
            func.substr(outbox_task_id, 21, 12),
        )

    def argument_matches(
        self, args: ColumnElement[Any], kwargs: ColumnElement[Any], values: Sequence[Any]
    ) -> ColumnElement[bool]:
        return or_(_JsonItemsMatch(args, "$[*]", values), _JsonItemsMatch(kwargs, "$.*", values))

    def estimated_rows(self, conn: Connection, table: Table) -> int:
        # InnoDB's own estimate (information_schema) is up to a day old on MySQL 8, whose
        # statistics cache expires daily; the key's span is current and costs two lookups.
        return key_span_rows(conn, table)

    def insert(self, table: Table) -> Any:
        return mysql_insert(table)

    def upsert(
        self,
        table: Table,
        values: Mapping[str, Any],
        key: Sequence[str],
        set_: Mapping[str, Any] | None = None,
    ) -> Insert:
        statement = self.insert(table).values(dict(values))
        if set_ is None:
            set_ = {name: statement.inserted[name] for name in values if name not in key}
        # Assignments run left to right, each seeing the ones before it: the caller's
        # order is kept (see ``Store._next_in_line_upsert``).
        upsert: Insert = statement.on_duplicate_key_update(list(set_.items()))
        return upsert

    def next_in_line(self, conn: Executor, table: Table, key: str, now: Any) -> tuple[int, bool]:
        # An existing key is updated by its primary key: a lock on its row alone. An
        # upsert that finds the row would also lock the gap before it, until the writer
        # commits, and a writer creating a key that sorts into that gap would wait for
        # it: writers to other keys must never wait. Only a new key is upserted (two
        # writers may create it at once). No RETURNING: the transaction reads its own
        # write back, under the row's lock, so no other writer can come between.
        c = table.c
        params = {"new_key": key, "at": now}
        updated = conn.execute(self._next_in_line_update(table), params)
        if not updated.rowcount:  # type: ignore[attr-defined]
            statement = self._next_in_line_statements.get(table.fullname)
            if statement is None:
                statement = self._next_in_line_statements[table.fullname] = (
                    self._next_in_line_statement(table)
                )
            conn.execute(statement, params)
        seq, head = conn.execute(
            select(c.last_seq, c.head_seq).where(c.key == bindparam("of_key", key))
        ).one()
        return int(seq), head == seq

    def _next_in_line_statement(self, table: Table) -> Insert:
        return self._next_in_line_upsert(table)

    def _next_in_line_update(self, table: Table) -> Update:
        """The upsert's UPDATE alone, for a key that exists (in the same order)."""
        statement = self._next_in_line_updates.get(table.fullname)
        if statement is None:
            c = table.c
            idle = c.head_seq.is_(None)
            now = bindparam("at", type_=c.updated_at.type)
            statement = self._next_in_line_updates[table.fullname] = (
                update(table)
                .where(c.key == bindparam("new_key", type_=c.key.type))
                .ordered_values(
                    (c.head_since, case((idle, now), else_=c.head_since)),
                    (c.head_seq, case((idle, c.last_seq + 1), else_=c.head_seq)),
                    (c.last_seq, c.last_seq + 1),
                    (c.updated_at, now),
                )
            )
        return statement

    def update_one(self, conn: Executor, change: RowUpdate, params: Mapping[str, Any]) -> Any:
        pair = self._row_update_pairs.get(change)
        if pair is None:
            pair = self._row_update_pairs[change] = _locking_pair(change)
        find, write = pair
        found = conn.execute(find, dict(params)).first()
        if found is None:
            return None
        row_key, value = found
        conn.execute(write, {**params, "row_key": row_key})
        return value

    def among(self, key: ColumnElement[Any], rows: Select[Any]) -> ColumnElement[bool]:
        # The table being changed may be read only through a derived table (errors 1093
        # and 1235 otherwise), and an IN of one is answered by scanning the whole table:
        # joined instead (a multi-table UPDATE or DELETE), each row is found by its key.
        derived = rows.subquery("own_rows")
        [column] = derived.c
        return key == column

    def database_now(self, conn: Connection) -> datetime:
        # UTC_TIMESTAMP, not NOW(): the session's time zone does not enter into it.
        now = conn.execute(select(func.utc_timestamp(6))).scalar_one()
        return now.replace(tzinfo=UTC)  # type: ignore[no-any-return]

    def wake_relays(self, conn: Executor) -> None:
        # Nothing can wake a listener: the relays find the row at their next poll.
        return


def _locking_pair(change: RowUpdate) -> tuple[Select[Any], Update]:
    """The SELECT … FOR UPDATE that finds and locks ``change``'s row, and the UPDATE of
    that row by its primary key."""
    [pk] = change.table.primary_key.columns
    find = select(pk, change.returning).where(change.where)
    if change.order_by is not None:
        find = find.order_by(change.order_by)
    find = find.limit(1).with_for_update()
    write = (
        update(change.table)
        .where(pk == bindparam("row_key", type_=pk.type))
        .values(dict(change.values))
    )
    return find, write


def _read_committed(engine: Engine) -> bool:
    """Whether every connection of ``engine`` runs under READ COMMITTED: asked for at
    checkout, or set when each was opened (``create_engine(isolation_level=...)``)."""
    if engine.get_execution_options().get("isolation_level") == "READ COMMITTED":
        return True
    return getattr(engine.dialect, "_on_connect_isolation_level", None) == "READ COMMITTED"


def _dotted(version: tuple[int, ...]) -> str:
    return ".".join(str(part) for part in version) or "(unknown version)"


class _JsonItemsMatch(ColumnElement[bool]):
    """SQL: one of the JSON items at ``path`` of ``column`` (an array's elements,
    ``$[*]``; an object's values, ``$.*``) equals one of ``values``.

    ``JSON_CONTAINS`` would also match values nested deeper (``[[42]]`` contains 42), and
    compares text by the column's case-insensitive collation: the items are listed with
    ``JSON_TABLE`` and compared one level deep, text byte for byte, numbers as numbers,
    objects as compact JSON.
    """

    inherit_cache = False
    type = Boolean()

    def __init__(self, column: ColumnElement[Any], path: str, values: Sequence[Any]) -> None:
        if path not in ("$[*]", "$.*"):
            raise ValueError(f"path={path!r}: items are listed at $[*] or $.* only")
        self.column = column
        self.path = path
        self.values = tuple(values)


@compiles(_JsonItemsMatch)
def _compile_json_items_match(element: _JsonItemsMatch, compiler: SQLCompiler, **kw: Any) -> str:
    def bound(value: Any) -> str:
        return compiler.process(bindparam(None, value, unique=True), **kw)

    conditions = []
    for value in element.values:
        if isinstance(value, str):
            conditions.append(
                f"(JSON_TYPE(item.v) = 'STRING' AND "
                f"CONVERT(JSON_UNQUOTE(item.v) USING utf8mb4) COLLATE utf8mb4_bin = "
                f"{bound(value)})"
            )
        elif isinstance(value, int | float) and not isinstance(value, bool):
            conditions.append(
                f"(JSON_TYPE(item.v) IN ('INTEGER', 'UNSIGNED INTEGER', 'DOUBLE', 'DECIMAL') "
                f"AND item.n = {bound(float(value))})"
            )
        else:
            minified = bound(json.dumps(value, separators=(",", ":")))
            # MariaDB's JSON is text: compared compacted. MySQL's is a type of its own,
            # compared as JSON values.
            same = (
                f"JSON_COMPACT(item.v) = JSON_COMPACT({minified})"
                if getattr(compiler.dialect, "is_mariadb", False)
                else f"item.v = CAST({minified} AS JSON)"
            )
            conditions.append(f"(JSON_TYPE(item.v) = 'OBJECT' AND {same})")
    column = compiler.process(element.column, **kw)
    matches = " OR ".join(conditions) or "FALSE"
    # The path is one of two constants: JSON_TABLE takes it as a literal only. Every
    # value is a bound parameter.
    items = f"JSON_TABLE({column}, '{element.path}' COLUMNS ({_ITEM_COLUMNS})) AS item"
    return f"EXISTS (SELECT 1 FROM {items} WHERE {matches})"  # noqa: S608


#: Each item as JSON, and as a number where it is one.
_ITEM_COLUMNS = "v JSON PATH '$', n DOUBLE PATH '$' NULL ON ERROR"
