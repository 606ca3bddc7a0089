"""What a real PostgreSQL server streams from a pgoutput slot decodes to the outbox's rows.

On a cluster of the run's own with ``wal_level = logical``: rows enqueued through the
outbox, committed, rolled back, updated, deleted and truncated, read back from a slot
through the SQL interface and through psycopg 2's streaming replication connection.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg2
import psycopg2.extras
import pytest
from celery import Celery
from sqlalchemy import Engine, delete, text, update
from sqlalchemy.orm import Session

from outbox import TaskOutbox
from outbox.data.schema import outbox_table
from outbox.postgres.pgoutput import (
    Begin,
    Commit,
    Delete,
    Insert,
    Message,
    Relation,
    Relations,
    Truncate,
    Update,
    decode,
)
from tests.logical_postgres import LogicalCluster, read_until_commit

pytestmark = pytest.mark.postgresql

PUBLICATION, SLOT = "outbox_test_pub", "outbox_test_slot"
OPTIONS = ("proto_version", "1", "publication_names", PUBLICATION)
#: How long a streamed change may take to arrive (a bound on a wait, not a delay).
STREAM_TIMEOUT = 10.0
_t = outbox_table.c


@pytest.fixture
def slot(logical_engine: Engine) -> Engine:
    with logical_engine.begin() as conn:
        conn.execute(text(f"CREATE PUBLICATION {PUBLICATION} FOR TABLE celery_outbox"))
    # A transaction that wrote cannot create a slot.
    with logical_engine.begin() as conn:
        conn.execute(text(f"SELECT pg_create_logical_replication_slot('{SLOT}', 'pgoutput')"))
    return logical_engine


def changes(engine: Engine) -> list[Message]:
    """Everything the slot holds, consumed."""
    with engine.begin() as conn:
        rows = conn.execute(
            text(
                "SELECT data FROM pg_logical_slot_get_binary_changes("
                f"'{SLOT}', NULL, NULL, {', '.join(repr(o) for o in OPTIONS)})"
            )
        )
        return [decode(bytes(row.data)) for row in rows]


def enqueue(engine: Engine, celery_app: Celery, *args: int, commit: bool = True) -> list[str]:
    outbox = TaskOutbox(celery_app)
    with Session(engine) as session:
        ids = [
            outbox.apply_async("orders.notify_customer", args=(n,), session=session).id
            for n in args
        ]
        session.commit() if commit else session.rollback()
    return ids


def test_an_enqueue_decodes_to_its_row(slot: Engine, celery_app: Celery) -> None:
    """One committed transaction of two enqueues: a Begin, the table's Relation, two
    Inserts whose text values are the row's, and a Commit past them; a rolled-back
    enqueue streams nothing."""
    before = datetime.now(UTC)
    task_ids = enqueue(slot, celery_app, 7, 8)
    enqueue(slot, celery_app, 9, commit=False)
    messages = changes(slot)
    assert [Begin, Relation, Insert, Insert, Commit] == [type(m) for m in messages]
    begin, relation, first, second, commit = messages
    assert isinstance(begin, Begin)
    assert isinstance(commit, Commit)
    assert isinstance(relation, Relation)
    assert isinstance(first, Insert)
    assert isinstance(second, Insert)
    assert ("public", "celery_outbox") == (relation.namespace, relation.name)
    assert begin.final_lsn == commit.commit_lsn < commit.end_lsn
    assert before - timedelta(seconds=5) < begin.commit_time <= datetime.now(UTC)
    relations = Relations()
    relations.add(relation)
    rows = [relations.row(m.relation_oid, m.new) for m in (first, second)]
    assert task_ids == [row["task_id"] for row in rows]
    assert [[7], [8]] == [json.loads(str(row["args"])) for row in rows]
    assert ["pending", "pending"] == [row["status"] for row in rows]
    assert [None, None] == [row["ordering_key"] for row in rows]


def test_updates_deletes_and_truncates_decode(slot: Engine, celery_app: Celery) -> None:
    """What the outbox's own statements do to rows later streams too (a CDC relay skips
    it): the primary key of a deleted row, the new row of an update, a truncate."""
    enqueue(slot, celery_app, 1)
    with slot.begin() as conn:
        conn.execute(update(outbox_table).values(status="dispatched"))
    with slot.begin() as conn:
        conn.execute(delete(outbox_table))
    with slot.begin() as conn:
        conn.execute(text("TRUNCATE celery_outbox"))
    kinds = [type(m) for m in changes(slot)]
    assert [Begin, Relation, Insert, Commit] == kinds[:4]
    assert [Begin, Update, Commit, Begin, Delete, Commit] == kinds[4:10]
    # A truncate describes its table again first.
    assert [Begin, Relation, Truncate, Commit] == kinds[10:]


def test_a_replication_connection_streams_the_same_bytes(
    slot: Engine, celery_app: Celery, logical_postgres: LogicalCluster
) -> None:
    """psycopg 2's logical replication connection (the CDC relay's driver) receives each
    message as pgoutput bytes, and a confirmed position is not sent again."""
    database = slot.url.database
    assert database is not None
    (first_id,) = enqueue(slot, celery_app, 1)
    received, end_lsn = stream_until_commit(logical_postgres.dsn(database), start_lsn=0)
    assert [Begin, Relation, Insert, Commit] == [type(m) for m in received]
    (second_id,) = enqueue(slot, celery_app, 2)
    again, _ = stream_until_commit(logical_postgres.dsn(database), start_lsn=end_lsn)
    inserts = [m for m in again if isinstance(m, Insert)]
    relations = Relations()
    relations.add(next(m for m in again if isinstance(m, Relation)))
    assert [second_id] == [relations.row(m.relation_oid, m.new)["task_id"] for m in inserts]
    assert first_id != second_id


def stream_until_commit(dsn: str, start_lsn: int) -> tuple[list[Message], int]:
    """Stream from ``start_lsn`` until a Commit arrives; confirm it; the messages."""
    conn: Any = psycopg2.connect(
        dsn, connection_factory=psycopg2.extras.LogicalReplicationConnection
    )
    try:
        cursor = conn.cursor()
        cursor.start_replication(
            slot_name=SLOT,
            decode=False,
            start_lsn=start_lsn,
            options=dict(zip(OPTIONS[::2], OPTIONS[1::2], strict=True)),
        )
        messages, end_lsn = read_until_commit(cursor, STREAM_TIMEOUT)
        cursor.send_feedback(flush_lsn=end_lsn, force=True)
        return messages, end_lsn
    finally:
        conn.close()
