"""The statements each store writes, run on every database the outbox supports:
PostgreSQL, MariaDB and SQLite (``store_engine``).

The claim and its row locks, timestamps and task ids as stored, the processed-id match,
the per-key sequence and its hand-over, upserts, the batched purges and the row
estimate: what differs between the databases is in ``outbox.data``, and these tests
hold each of them to the same behaviour.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from celery import Celery
from kombu.transport import memory
from sqlalchemy import Engine, event, func, insert, select, update
from sqlalchemy.orm import Session

from outbox import OutboxSettings, OutboxStatus, Relay, TaskOutbox, outbox_table
from outbox.data import store_for
from outbox.data.schema import ProcessedMessage, keys_table, relays_table
from outbox.maintenance.heartbeat import Heartbeat, RelayKind
from outbox.maintenance.retention import purge_idle_keys, purge_outbox, purge_processed
from outbox.ordering.handover import Place, finish
from tests.services import lock_waiters, wait_for
from tests.unit.conftest import memory_app

_t = outbox_table.c
_k = keys_table.c
#: How long a test waits for another connection to block or go on.
BLOCKING = 10.0


@pytest.fixture
def memory_celery() -> Iterator[Celery]:
    memory.Channel.queues.clear()
    app = memory_app("stores")
    # CELERY_BROKER_URL (this run's Redis) outranks broker=: these outrank it.
    app.conf.broker_url = app.conf.broker_read_url = app.conf.broker_write_url = "memory://"

    @app.task(name="stores.echo", shared=False)
    def echo(*args: Any, **kwargs: Any) -> Any:
        return args, kwargs

    yield app
    memory.Channel.queues.clear()


def enqueue(engine: Engine, app: Celery, count: int = 1, **options: Any) -> list[str]:
    tasks = TaskOutbox(app)
    with Session(engine) as session:
        ids = [
            tasks.apply_async("stores.echo", args=[n], session=session, **options).id
            for n in range(count)
        ]
        session.commit()
    return ids


def rows(engine: Engine) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(select(outbox_table).order_by(_t.id)))


def test_a_row_is_claimed_published_and_marked(store_engine: Engine, memory_celery: Celery) -> None:
    """The task id round-trips as stored; timestamps come back aware, in UTC, with their
    microseconds (MariaDB's DATETIME would drop them without a precision)."""
    [task_id] = enqueue(store_engine, memory_celery)
    before = datetime.now(UTC)
    result = Relay(store_engine, memory_celery).run_once()
    assert (1, 1) == (result.claimed, result.published)
    [row] = rows(store_engine)
    assert (uuid.UUID(task_id), OutboxStatus.DISPATCHED) == (row.task_id, row.status)
    assert row.dispatched_at.tzinfo is not None
    assert row.dispatched_at.utcoffset() == timedelta(0)
    assert before <= row.dispatched_at <= datetime.now(UTC)
    exact = datetime(2026, 12, 3, 10, 11, 12, 345678, tzinfo=UTC)
    with store_engine.begin() as conn:
        conn.execute(update(outbox_table).values(available_at=exact))
        assert exact == conn.execute(select(_t.available_at)).scalar_one()
    [message] = list(memory.Channel.queues["celery"].queue)
    assert task_id == message["headers"]["id"]


def test_two_relays_claim_disjoint_rows(store_engine: Engine, memory_celery: Celery) -> None:
    """While one relay's batch holds its rows, another claims the rest (SKIP LOCKED)."""
    if store_engine.dialect.name == "sqlite":
        pytest.skip("SQLite has one writer: a second claim waits for the first batch")
    enqueue(store_engine, memory_celery, 30)
    first = Relay(store_engine, memory_celery, OutboxSettings(batch_size=10))
    second = Relay(store_engine, memory_celery, OutboxSettings(batch_size=100))
    with first.store.relay_connection(first.engine) as conn, conn.begin():
        held = {row.id for row in first._claim(conn)}
        assert 10 == len(held)
        result = second.run_once()
    assert 20 == result.published
    dispatched = {row.id for row in rows(store_engine) if row.status == OutboxStatus.DISPATCHED}
    assert not held & dispatched
    assert 20 == len(dispatched)


def test_a_claim_does_not_block_a_concurrent_enqueue(
    store_engine: Engine, memory_celery: Celery
) -> None:
    """A relay's open batch never makes the application's INSERT wait (no gap locks)."""
    if store_engine.dialect.name == "sqlite":
        pytest.skip("SQLite has one writer: an enqueue waits for the batch")
    enqueue(store_engine, memory_celery, 5)
    relay = Relay(store_engine, memory_celery)
    done = threading.Event()
    with relay.store.relay_connection(relay.engine) as conn, conn.begin():
        assert 5 == len(relay._claim(conn))
        writer = threading.Thread(target=lambda: (enqueue(store_engine, memory_celery), done.set()))
        writer.start()
        assert done.wait(BLOCKING), "the enqueue waited for the relay's batch"
    writer.join(BLOCKING)
    assert 6 == len(rows(store_engine))


def test_a_processed_marker_matches_its_outbox_row(
    store_engine: Engine, memory_celery: Celery
) -> None:
    """Celery's hyphenated id in the markers equals the outbox's stored UUID."""
    ids = enqueue(store_engine, memory_celery, 3)
    store = store_for(store_engine)
    marker = ProcessedMessage.__table__
    with store_engine.begin() as conn:
        conn.execute(
            insert(marker).values(
                task_id=ids[1], task_name="stores.echo", processed_at=datetime.now(UTC)
            )
        )
        matched = conn.execute(
            select(_t.task_id).where(
                select(marker.c.task_id)
                .where(store.processed_id_matches(marker.c.task_id, _t.task_id))
                .exists()
            )
        ).scalars()
        assert [uuid.UUID(ids[1])] == list(matched)


def key_row(engine: Engine, key: str) -> tuple[int, int | None]:
    with engine.connect() as conn:
        last_seq, head_seq = conn.execute(
            select(_k.last_seq, _k.head_seq).where(_k.key == key)
        ).one()
    return last_seq, head_seq


def test_a_key_numbers_its_tasks_and_hands_itself_on_in_order(
    store_engine: Engine, memory_celery: Celery
) -> None:
    """The first task holds the key, the others are held; each finish promotes the next."""
    enqueue(store_engine, memory_celery, 3, ordering_key="order:7")
    statuses = [(row.ordering_seq, row.status) for row in rows(store_engine)]
    assert [(1, "pending"), (2, "held"), (3, "held")] == statuses
    assert (3, 1) == key_row(store_engine, "order:7")
    now = datetime.now(UTC)
    with store_engine.begin() as conn:
        assert finish(conn, Place("order:7", 1), now)
    with store_engine.begin() as conn:
        assert not finish(conn, Place("order:7", 1), now), "a repeated finish changes nothing"
    assert (3, 2) == key_row(store_engine, "order:7")
    assert "pending" == rows(store_engine)[1].status
    for seq in (2, 3):
        with store_engine.begin() as conn:
            assert finish(conn, Place("order:7", seq), now)
    assert (3, None) == key_row(store_engine, "order:7")
    # Idle again: the next task holds the key at once.
    enqueue(store_engine, memory_celery, 1, ordering_key="order:7")
    assert (4, 4) == key_row(store_engine, "order:7")


def behind_first_writer(engine: Engine, key: str, *, commit: bool) -> list[tuple[int, bool]]:
    """A first writer takes ``key``'s next number; a second one, started meanwhile, must
    wait on the key's row (seen waiting on a lock) until the first commits or rolls back.
    Returns what the second one got."""
    if engine.dialect.name == "sqlite":
        pytest.skip("SQLite has one writer: the second transaction cannot even start")
    store = store_for(engine)
    now = datetime.now(UTC)
    taken: list[tuple[int, bool]] = []

    def second_writer() -> None:
        with engine.begin() as conn:
            taken.append(store.next_in_line(conn, keys_table, key, now))

    with engine.connect() as conn:
        first = conn.begin()
        store.next_in_line(conn, keys_table, key, now)
        writer = threading.Thread(target=second_writer)
        writer.start()
        # Slower than the default poll: MariaDB refreshes its transactions' table only
        # when it has not been read for 0.1 s.
        wait_for(lambda: lock_waiters(engine) > 0, timeout=BLOCKING, interval=0.25)
        assert [] == taken, "the second writer did not wait for the first"
        if commit:
            first.commit()
        else:
            first.rollback()
    writer.join(BLOCKING)
    return taken


def test_writers_to_one_key_take_numbers_in_commit_order(store_engine: Engine) -> None:
    """The second writer waits on the key's row until the first commits, then comes next."""
    assert [(2, False)] == behind_first_writer(store_engine, "order:9", commit=True)
    assert (2, 1) == key_row(store_engine, "order:9")


def test_a_rolled_back_writer_lets_the_waiting_one_take_its_place(store_engine: Engine) -> None:
    """The first writer to a new key rolls back: the one waiting behind it gets number 1
    and holds the key."""
    assert [(1, True)] == behind_first_writer(store_engine, "order:10", commit=False)
    assert (1, 1) == key_row(store_engine, "order:10")


def test_an_upsert_inserts_then_updates(store_engine: Engine) -> None:
    """A relay's heartbeat: one row per relay, moved forward by each beat."""
    heartbeat = Heartbeat(store_engine, store_for(store_engine), RelayKind.RELAY, hostname="h")
    first = datetime.now(UTC)
    heartbeat.beat(first)
    heartbeat.beat(first + timedelta(seconds=5))
    with store_engine.connect() as conn:
        seen = conn.execute(select(relays_table.c.name, relays_table.c.last_seen_at)).all()
    assert [("relay@h", first + timedelta(seconds=5))] == seen


def test_only_where_a_cdc_relay_can_stream_is_its_heartbeat_heeded(
    store_engine: Engine, memory_celery: Celery
) -> None:
    """On PostgreSQL a live CDC relay's heartbeat makes a polling relay leave it the rows
    it streams; elsewhere no CDC relay can run, and a relay does not even ask."""
    store = store_for(store_engine)
    Heartbeat(store_engine, store, RelayKind.CDC, hostname="h").beat(datetime.now(UTC))
    enqueue(store_engine, memory_celery)
    relay = Relay(store_engine, memory_celery)
    asked: list[str] = []

    def note(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT") and relays_table.name in statement:
            asked.append(statement)

    event.listen(store_engine, "before_cursor_execute", note)
    try:
        result = relay.run_once()
    finally:
        event.remove(store_engine, "before_cursor_execute", note)
    if store.streams_changes:
        assert 0 == result.claimed
        assert asked
    else:
        assert 1 == result.claimed
        assert [] == asked


def test_the_purges_delete_old_rows_in_batches_and_keep_the_rest(
    store_engine: Engine, memory_celery: Celery
) -> None:
    """Dispatched rows by age (not those awaiting confirmation), processed ids, idle keys."""
    enqueue(store_engine, memory_celery, 7)
    enqueue(store_engine, memory_celery, 1, ordering_key="order:1")
    Relay(store_engine, memory_celery).run_once()
    enqueue(store_engine, memory_celery, 2)
    now = datetime.now(UTC)
    awaiting = rows(store_engine)[0].id
    with store_engine.begin() as conn:
        conn.execute(update(outbox_table).where(_t.id == awaiting).values(confirm_deadline=now))
        conn.execute(
            insert(ProcessedMessage.__table__),
            [
                {"task_id": str(uuid.uuid4()), "task_name": "x", "processed_at": now}
                for _ in range(5)
            ],
        )
    with store_engine.begin() as conn:
        finish(conn, Place("order:1", 1), now)
    later = now + timedelta(seconds=1)
    batches: list[int] = []
    assert 7 == purge_outbox(store_engine, later, batch_size=3, progress=batches.append)
    assert [3, 3, 1] == batches
    left = rows(store_engine)
    assert [awaiting] == [row.id for row in left if row.status == OutboxStatus.DISPATCHED]
    assert 2 == sum(row.status == OutboxStatus.PENDING for row in left)
    assert 5 == purge_processed(store_engine, later, batch_size=2)
    assert 1 == purge_idle_keys(store_engine, later, batch_size=2)
    with store_engine.connect() as conn:
        assert 0 == conn.execute(select(func.count()).select_from(keys_table)).scalar_one()


def test_the_row_estimate_follows_inserts_without_counting(
    store_engine: Engine, memory_celery: Celery
) -> None:
    """The primary key's span: current at once, and close to the rows written."""
    if store_engine.dialect.name == "postgresql":
        pytest.skip(
            "PostgreSQL's estimate is its statistics, which other connections' late reports "
            "move in a shared test database: test_probe_plans checks it beside a million rows"
        )
    rows = 1000
    enqueue(store_engine, memory_celery, rows)
    with store_engine.connect() as conn:
        found = store_for(conn).estimated_rows(conn, outbox_table)
    assert 0.9 * rows <= found <= 1.1 * rows
