"""What the CDC relay tells the server it has confirmed, on interleavings a real server
produces only by chance: a keepalive right after a Relation message, and a broker down
for longer than ``wal_sender_timeout``.

The relay streams from a walsender of the test's own (``tests.fake_cdc_walsender``),
which records every status update; its table writes (heartbeat, marks) go to a database
of the logical cluster, and its tasks to a real Redis.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import redis
from celery import Celery
from sqlalchemy import Engine

from outbox.data.schema import outbox_table
from outbox.postgres.pgoutput import Begin, Column, Commit, Insert, Relation
from outbox.relays import cdc as cdc_relay
from outbox.relays.cdc import CdcRelay
from tests.chaos.redis_server import RedisServer
from tests.fake_cdc_walsender import FakeWalsender, keepalive, xlog_data
from tests.integration.test_cdc_relay import GatedPublisher, published_ids
from tests.services import app_on, wait_for

pytestmark = pytest.mark.postgresql

OID = 16400
#: The outbox table as pgoutput describes it (each column as text: the relay reads text).
RELATION = Relation(
    OID,
    "public",
    outbox_table.name,
    "d",
    tuple(Column(c.name, 25, -1, key=c.name == "id") for c in outbox_table.columns),
)


def transaction(
    engine: Engine, begin_at: int, end_lsn: int, xid: int, queue: str, row_id: int
) -> tuple[list[bytes], str]:
    """One committed transaction enqueuing one task, as a server streams it (the Relation
    message first, its ``dataStart`` 0), and its task id. The row is in the table too,
    pending, as the stream's rows are."""
    now = datetime.now(UTC)
    task_id = uuid.uuid4()
    with engine.begin() as conn:
        conn.execute(
            outbox_table.insert().values(
                id=row_id,
                task_id=task_id,
                task_name="orders.notify_customer",
                args=[row_id],
                kwargs={},
                options={"queue": queue},
                status="pending",
                attempts=0,
                created_at=now,
                available_at=now,
            )
        )
    values = {c.name: None for c in outbox_table.columns} | {
        "id": str(row_id),
        "task_id": task_id.hex,
        "task_name": "orders.notify_customer",
        "args": f"[{row_id}]",
        "kwargs": "{}",
        "options": f'{{"queue": "{queue}"}}',
        "status": "pending",
        "attempts": "0",
        "deliveries": "0",
        "created_at": now.isoformat(),
        "available_at": now.isoformat(),
    }
    messages = [
        xlog_data(begin_at, Begin(end_lsn - 0x10, now, xid)),
        xlog_data(0, RELATION),
        xlog_data(begin_at, Insert(OID, tuple(values[c.name] for c in outbox_table.columns))),
        xlog_data(end_lsn, Commit(0, end_lsn - 0x10, end_lsn, now)),
    ]
    return messages, str(task_id)


@pytest.fixture
def queue(redis_client: redis.Redis) -> Iterator[str]:
    name = f"cdc-ws-{uuid.uuid4().hex[:8]}"
    yield name
    redis_client.delete(name)


class Streaming:
    """A CDC relay in a thread, streaming from ``walsender``."""

    def __init__(
        self,
        engine: Engine,
        celery_app: Celery,
        walsender: FakeWalsender,
        monkeypatch: pytest.MonkeyPatch,
        *,
        gated: bool = False,
    ) -> None:
        monkeypatch.setattr(cdc_relay, "_dsn", lambda _: walsender.dsn)
        self.relay = CdcRelay(engine, celery_app)
        self.gate = GatedPublisher(self.relay.publisher, closed=gated)
        self.relay.publisher = self.gate  # type: ignore[assignment]
        self.thread = threading.Thread(target=self.relay.run, kwargs={"ensured": True}, daemon=True)
        self.thread.start()
        wait_for(walsender.streaming.is_set)
        wait_for(self.relay.streaming.is_set)

    def stop(self) -> None:
        self.gate.open.set()
        self.relay.stop()
        self.thread.join(timeout=30)
        assert not self.thread.is_alive(), "the relay did not stop"


def test_a_keepalive_after_a_relation_message_confirms_nothing_unpublished(
    logical_engine: Engine,
    celery_app: Celery,
    redis_client: redis.Redis,
    queue: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A transaction received and not yet on the broker, then the next one's Relation
    message (``dataStart`` 0), then a keepalive asking for a reply from far past both:
    the reply, and every status update after it, confirm no further than the broker
    holds (psycopg 2 alone would confirm the keepalive's position)."""
    walsender = FakeWalsender()
    first, task_id = transaction(logical_engine, 0x1000, 0x1100, 7, queue, 1)
    second, _ = transaction(logical_engine, 0x1100, 0x1200, 8, queue, 2)
    streaming = Streaming(logical_engine, celery_app, walsender, monkeypatch, gated=True)
    try:
        walsender.send(*first, *second[:2], keepalive(0x1300, reply=True))
        wait_for(streaming.gate.entered.is_set)
        wait_for(lambda: any(s.after_keepalives == 1 for s in walsender.statuses))
        assert 0 == max(s.flush for s in walsender.statuses), "nothing is on the broker yet"
        streaming.gate.open.set()
        wait_for(lambda: walsender.statuses[-1].flush == 0x1100)
        assert [task_id] == published_ids(redis_client, queue)
        walsender.send(keepalive(0x1400, reply=True))
        wait_for(lambda: any(s.after_keepalives == 2 for s in walsender.statuses))
        assert 0x1100 == max(s.flush for s in walsender.statuses), "the second is unfinished"
    finally:
        streaming.stop()
        walsender.close()


def test_a_broker_down_for_longer_than_wal_sender_timeout_keeps_the_stream(
    logical_engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the broker is down, the relay keeps telling the server it is alive (the
    walsender would end a connection silent for its timeout, and a standby would take
    the slot): the stream survives several timeouts, and the transaction is published
    once, and confirmed, when the broker is up."""
    walsender = FakeWalsender(timeout=2.5)
    queue = "cdc-outage"
    (tmp_path / "redis-data").mkdir()
    # Not started yet: the broker is down from the first publish.
    broker = RedisServer(tmp_path / "redis-data", tmp_path, persistent=False)
    streaming = Streaming(logical_engine, app_on(broker.url, "cdc-outage"), walsender, monkeypatch)
    try:
        messages, task_id = transaction(logical_engine, 0x1000, 0x1100, 7, queue, 1)
        walsender.mark()
        walsender.send(*messages)
        # Four timeouts, counted by the walsender's own watchdog (a quarter each).
        wait_for(lambda: walsender.timed_out.is_set() or walsender.rounds_survived() >= 16)
        assert not walsender.timed_out.is_set(), "the walsender timed the relay out"
        assert 0 == streaming.relay.transactions
        assert all(s.flush == 0 for s in walsender.statuses)
        # Up while a publish retries its connection (kombu's retries take 12 s here):
        # one that gave up just before would blame the row, the broker answering by then.
        streaming.gate.entered.clear()
        wait_for(streaming.gate.entered.is_set)
        broker.start()
        wait_for(lambda: streaming.relay.transactions == 1, timeout=60)
        assert [task_id] == published_ids(broker.client, queue)
        wait_for(lambda: walsender.statuses[-1].flush == 0x1100)
        assert 1 == walsender.connections, "one stream throughout"
    finally:
        streaming.stop()
        walsender.close()
        broker.kill()
        broker.client.close()
