"""PostgreSQL: row locks with ``SKIP LOCKED``, LISTEN/NOTIFY, JSONB containment."""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, ClassVar

from sqlalchemy import (
    ColumnElement,
    Insert,
    String,
    Table,
    Text,
    Update,
    bindparam,
    cast,
    column,
    func,
    insert,
    or_,
    select,
    text,
)
from sqlalchemy import type_coerce as coerce
from sqlalchemy.dialects.postgresql import JSONB, JSONPATH
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import Connection, Engine

from outbox.data.base import Executor, Store

#: The channel a committed enqueue notifies on PostgreSQL (see ``relay_loop``).
NOTIFY_CHANNEL = "celery_outbox"

#: How many relays wait on LISTEN now, kept by the relays (``outbox.postgres.wakeups``): what
#: decides whether a committing enqueue notifies. A sequence, read with
#: ``pg_sequence_last_value``, because that read takes no snapshot and runs no query: it
#: fits in the trigger's ``WHEN`` clause, so an INSERT while nobody waits neither calls
#: the trigger's function nor queues a trigger event. A table read there cost 64
#: concurrent writers about 10 % of their rate (docs/benchmarks.md).
WAITING_SEQUENCE = "celery_outbox_waiting"

#: Whether a relay waits on LISTEN now, as a SQL condition.
SOME_RELAY_WAITING = f"pg_sequence_last_value('{WAITING_SEQUENCE}') > 0"

#: ``synchronous_commit = off`` for the current transaction only (``SET LOCAL``), as an
#: expression, so it travels inside the statement instead of costing a round trip.
_ASYNC_COMMIT = select(func.set_config("synchronous_commit", "off", True)).scalar_subquery()

_WAKE = select(func.pg_notify(NOTIFY_CHANNEL, "")).where(text(SOME_RELAY_WAITING))


def _recordset_insert(table: Table, columns: tuple[str, ...]) -> Insert:
    """``INSERT INTO table (columns) SELECT columns FROM jsonb_to_recordset(:rows) AS
    r(column type, ...)``, the types those of ``table``."""
    rows = cast(bindparam("rows", type_=Text), JSONB)
    record = (
        func.jsonb_to_recordset(rows)
        .table_valued(*(column(name, table.c[name].type) for name in columns))
        .render_derived(name="r", with_types=True)
    )
    return insert(table).from_select(list(columns), select(*(record.c[n] for n in columns)))


def _json_scalar(value: Any) -> Any:
    """A row value JSON has no type for, as text PostgreSQL casts back to its column."""
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ValueError(f"{value!r} has no time zone: the outbox stores aware UTC times")
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    raise TypeError(f"{value!r} ({type(value).__name__}) is not a value of an outbox column")


#: The flush's INSERT when some rows have an ordering key but no number yet: one
#: statement that takes each key's next numbers (``Store.next_in_line``'s upsert, by the
#: key's count of rows, keys in sorted order so that two writers lock them in one order)
#: and inserts the rows with them, each key's rows numbered in their enqueue order. The
#: first number of a key nobody holds holds it (pending); the others are held.
_KEYED_INSERT = text(
    """
WITH r AS (
    SELECT * FROM jsonb_to_recordset(CAST(:rows AS jsonb)) AS r(
        n integer, task_id uuid, task_name varchar(255), args jsonb, kwargs jsonb,
        options jsonb, status varchar(16), attempts integer,
        created_at timestamp with time zone, available_at timestamp with time zone,
        ordering_key varchar(255), ordering_seq bigint
    )
),
wanted AS (
    SELECT ordering_key AS key, count(*) AS taken, max(created_at) AS at
    FROM r WHERE ordering_key IS NOT NULL AND ordering_seq IS NULL GROUP BY ordering_key
),
numbered AS (
    INSERT INTO celery_outbox_keys AS k (key, last_seq, head_seq, head_since, updated_at)
    SELECT key, taken, 1, at, at FROM wanted ORDER BY key
    ON CONFLICT (key) DO UPDATE SET
        head_since = CASE WHEN k.head_seq IS NULL THEN EXCLUDED.head_since
                          ELSE k.head_since END,
        head_seq = CASE WHEN k.head_seq IS NULL THEN k.last_seq + 1 ELSE k.head_seq END,
        last_seq = k.last_seq + EXCLUDED.last_seq,
        updated_at = EXCLUDED.updated_at
    RETURNING k.key, k.last_seq, k.head_seq
),
placed AS (
    SELECT r.*, numbered.head_seq,
        numbered.last_seq - wanted.taken
            + row_number() OVER (PARTITION BY r.ordering_key ORDER BY r.n) AS seq
    FROM r
    LEFT JOIN wanted ON wanted.key = r.ordering_key AND r.ordering_seq IS NULL
    LEFT JOIN numbered ON numbered.key = wanted.key
)
INSERT INTO celery_outbox (
    task_id, task_name, args, kwargs, options, status, attempts, created_at,
    available_at, ordering_key, ordering_seq
)
SELECT task_id, task_name, args, kwargs, options,
    CASE WHEN numbered_key AND seq <> head_seq THEN 'held' ELSE status END,
    attempts, created_at, available_at, ordering_key,
    CASE WHEN numbered_key THEN seq ELSE ordering_seq END
FROM (SELECT placed.*, head_seq IS NOT NULL AS numbered_key FROM placed) AS p
ORDER BY n
"""
)


class PostgresStore(Store):
    name: ClassVar[str] = "postgresql"
    numbers_keys_at_flush: ClassVar[bool] = True
    streams_changes: ClassVar[bool] = True
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

    def insert_rows(
        self, conn: Connection, table: Table, rows: Sequence[Mapping[str, Any]]
    ) -> None:
        if any(row.get("ordering_key") and row.get("ordering_seq") is None for row in rows):
            # Outbox rows enqueued with an ordering key into an ORM session: numbered here.
            numbered = [{**row, "n": place} for place, row in enumerate(rows)]
            conn.execute(_KEYED_INSERT, {"rows": json.dumps(numbered, default=_json_scalar)})
            return
        # One parameter, the rows as a JSON array, unpacked by jsonb_to_recordset: the
        # statement's text is the same for any number of rows, so psycopg parses it once
        # and the server prepares it once. A VALUES list takes a parameter per column
        # and row, and psycopg re-parses any statement with more than 50 of them on
        # every call (about 1.5 ms for 30 rows here).
        columns = tuple(rows[0])
        statement = self._row_inserts.get((table.fullname, columns))
        if statement is None:
            statement = self._row_inserts[(table.fullname, columns)] = _recordset_insert(
                table, columns
            )
        conn.execute(statement, {"rows": json.dumps(list(rows), default=_json_scalar)})

    def database_now(self, conn: Connection) -> datetime:
        # The statement's time, not the transaction's (now()): a long transaction reads
        # the time it asks.
        return conn.execute(select(func.statement_timestamp())).scalar_one()  # type: ignore[no-any-return]

    def wake_relays(self, conn: Executor) -> None:
        # Delivered when the transaction commits, dropped if it rolls back, and sent only
        # while a relay waits, like the INSERT trigger's.
        conn.execute(_WAKE)

    def relaxed_durability(self, statement: Update) -> Update:
        # The commit does not wait for the WAL flush: a database crash can lose the last
        # moment's bookkeeping, never anything the application wrote.
        return statement.where(_ASYNC_COMMIT.is_not(None))
