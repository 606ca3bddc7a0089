"""The CDC relay publishes committed enqueues from the write-ahead log, in commit order,
and confirms a transaction to the slot only once its tasks are on the broker.

On a PostgreSQL cluster of the run's own (``wal_level = logical``) and this run's Redis:
relays run in threads of the test, driven by what they report (streaming, confirmed
positions, published counts), never by sleeps.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
import redis
from celery import Celery
from click.testing import CliRunner
from kombu import Queue as KombuQueue
from prometheus_client import CollectorRegistry
from sqlalchemy import Engine, create_engine, select, text
from sqlalchemy.orm import Session

from outbox import OutboxSettings, OutboxStatus, Relay, TaskOutbox
from outbox.admin.cli import main
from outbox.data import store_for
from outbox.data.schema import outbox_table
from outbox.errors import CdcSetupError
from outbox.maintenance.heartbeat import Heartbeat, RelayKind
from outbox.observability.health import assess
from outbox.observability.metrics import register_outbox_collector
from outbox.observability.stats import collect_stats
from outbox.postgres.pgoutput import parse_lsn
from outbox.postgres.slot import CdcSlot
from outbox.relays.cdc import CdcRelay
from outbox.transports.amqp import ConfirmingPublisher
from tasks.orders import notify_customer
from tests.integration.test_amqp_confirms import drain_queue
from tests.logical_postgres import LogicalCluster
from tests.services import app_on, wait_for
from webapp import create_app
from webapp.extensions import db

pytestmark = pytest.mark.postgresql

_t = outbox_table.c


class GatedPublisher:
    """A relay's publisher behind a gate the test opens: each publish waits there, so the
    test acts while rows are received and not yet on the broker."""

    def __init__(self, publisher: Any, *, closed: bool = True) -> None:
        self.publisher = publisher
        #: Set once a publish reached the gate.
        self.entered = threading.Event()
        self.open = threading.Event()
        if not closed:
            self.open.set()

    def publish(self, rows: list[Any]) -> Any:
        self.entered.set()
        assert self.open.wait(60), "the test never opened the gate"
        return self.publisher.publish(rows)

    def close(self) -> None:
        self.publisher.close()


class RunningRelay:
    """A CDC relay in a thread of the test; ``gated``, its publishes wait for the test."""

    def __init__(
        self, engine: Engine, celery_app: Celery, *, gated: bool = False, **kwargs: object
    ) -> None:
        self.relay = CdcRelay(engine, celery_app, **kwargs)  # type: ignore[arg-type]
        self.gate = GatedPublisher(self.relay.publisher) if gated else None
        if self.gate is not None:
            self.relay.publisher = self.gate  # type: ignore[assignment]
        self.thread = threading.Thread(target=self.relay.run, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        if self.gate is not None:
            self.gate.open.set()
        self.relay.stop()
        self.thread.join(timeout=30)
        assert not self.thread.is_alive(), "the relay did not stop"


@pytest.fixture
def relays(logical_engine: Engine, celery_app: Celery) -> Iterator[list[RunningRelay]]:
    started: list[RunningRelay] = []
    yield started
    for running in started:
        running.stop()


@pytest.fixture
def queue(redis_client: redis.Redis) -> Iterator[str]:
    name = f"cdc-{uuid.uuid4().hex[:8]}"
    yield name
    redis_client.delete(name)


def start(
    relays: list[RunningRelay], engine: Engine, celery_app: Celery, **kwargs: object
) -> CdcRelay:
    running = RunningRelay(engine, celery_app, **kwargs)
    relays.append(running)
    return running.relay


def start_gated(
    relays: list[RunningRelay], engine: Engine, celery_app: Celery
) -> tuple[CdcRelay, GatedPublisher]:
    """A relay whose publishes wait for the test to open its gate."""
    running = RunningRelay(engine, celery_app, gated=True)
    relays.append(running)
    assert running.gate is not None
    return running.relay, running.gate


def published_ids(redis_client: redis.Redis, queue: str) -> list[str]:
    """Task ids in the queue, oldest first (kombu pushes on the left)."""
    messages = redis_client.lrange(queue, 0, -1)
    return [json.loads(m)["headers"]["id"] for m in reversed(messages)]


def statuses(engine: Engine) -> dict[str, str]:
    with engine.connect() as conn:
        return {str(i): s for i, s in conn.execute(select(_t.task_id, _t.status))}


def enqueue(session: Session, celery_app: Celery, queue: str, n: int, **options: object) -> str:
    return str(
        TaskOutbox(celery_app)
        .apply_async("orders.notify_customer", args=(n,), queue=queue, session=session, **options)
        .id
    )


def test_enqueues_are_published_in_commit_order_and_marked(
    logical_engine: Engine,
    celery_app: Celery,
    relays: list[RunningRelay],
    redis_client: redis.Redis,
    queue: str,
) -> None:
    """A transaction that enqueued first but committed last is published last; every
    row ends dispatched, and the slot's position moves past the last commit."""
    relay = start(relays, logical_engine, celery_app)
    wait_for(relay.streaming.is_set)
    with Session(logical_engine) as first, Session(logical_engine) as second:
        early = enqueue(first, celery_app, queue, 1)
        first.flush()
        late = [enqueue(second, celery_app, queue, n) for n in (2, 3)]
        second.commit()
        first.commit()
    wait_for(lambda: len(published_ids(redis_client, queue)) == 3)
    assert [*late, early] == published_ids(redis_client, queue)
    wait_for(lambda: set(statuses(logical_engine).values()) == {OutboxStatus.DISPATCHED})
    with logical_engine.connect() as conn:
        now = parse_lsn(conn.execute(text("SELECT pg_current_wal_lsn()::text")).scalar_one())
    wait_for(lambda: parse_lsn(relay.slot.state().confirmed or "0/0") >= now)
    assert 2 == relay.transactions


def test_rows_left_to_polling_are_not_streamed(
    logical_engine: Engine,
    celery_app: Celery,
    relays: list[RunningRelay],
    redis_client: redis.Redis,
    queue: str,
) -> None:
    """A countdown, an ordering key and a rolled-back enqueue stream
    nothing; the polling relay, told a stream runs, leaves the streamed row alone and
    takes the keyed one."""
    relay = start(relays, logical_engine, celery_app)
    wait_for(relay.streaming.is_set)
    with Session(logical_engine) as session:
        enqueue(session, celery_app, queue, 1, countdown=3600)
        keyed = enqueue(session, celery_app, queue, 2, ordering_key="order-1")
        streamed = enqueue(session, celery_app, queue, 3)
        session.commit()
    with Session(logical_engine) as session:
        enqueue(session, celery_app, queue, 4)
        session.rollback()
    wait_for(lambda: published_ids(redis_client, queue) == [streamed])
    wait_for(lambda: statuses(logical_engine)[streamed] == OutboxStatus.DISPATCHED)
    # A row streamed but not yet marked must not be claimed by polling meanwhile: put
    # one back to pending, as if its mark were still to come.
    with logical_engine.begin() as conn:
        conn.execute(
            outbox_table.update().where(_t.task_id == uuid.UUID(streamed)).values(status="pending")
        )
    poller = Relay(logical_engine, celery_app)
    try:
        result = poller.drain()
    finally:
        poller.close()
    assert 1 == result.published, "the keyed row, first of its key; not the streamed one"
    assert [streamed, keyed] == published_ids(redis_client, queue)


def test_a_stream_that_fails_after_publishing_publishes_again_unconfirmed(
    logical_engine: Engine,
    celery_app: Celery,
    relays: list[RunningRelay],
    redis_client: redis.Redis,
    queue: str,
) -> None:
    """The slot is confirmed only after the broker has a transaction's tasks: a relay
    that dies between the two streams the transaction again, under the same task ids."""
    failures = iter([RuntimeError("killed after publishing")])

    def die_once() -> None:
        error = next(failures, None)
        if error is not None:
            raise error

    relay = start(relays, logical_engine, celery_app, after_publish=die_once)
    wait_for(relay.streaming.is_set)
    with Session(logical_engine) as session:
        task_id = enqueue(session, celery_app, queue, 1)
        session.commit()
    wait_for(lambda: len(published_ids(redis_client, queue)) == 2)
    assert [task_id, task_id] == published_ids(redis_client, queue)
    wait_for(lambda: relay.transactions == 1)


def test_a_second_relay_stands_by_and_takes_over(
    logical_engine: Engine,
    celery_app: Celery,
    relays: list[RunningRelay],
    redis_client: redis.Redis,
    queue: str,
) -> None:
    """One relay streams from the slot at a time; the other takes it when the first
    stops, and publishes what was committed meanwhile."""
    first = start(relays, logical_engine, celery_app)
    wait_for(first.streaming.is_set)
    second = start(relays, logical_engine, celery_app)
    wait_for(second.standing_by.is_set)
    assert not second.streaming.is_set()
    assert 0 == second.takeovers
    relays[0].stop()
    with Session(logical_engine) as session:
        task_id = enqueue(session, celery_app, queue, 1)
        session.commit()
    wait_for(second.streaming.is_set)
    wait_for(lambda: published_ids(redis_client, queue) == [task_id])
    assert 1 == second.takeovers


def test_drop_slot_ends_the_stream_and_removes_slot_and_publication(
    logical_engine: Engine, celery_app: Celery
) -> None:
    slot = CdcSlot(logical_engine)
    assert slot.ensure() is True
    assert slot.ensure() is False, "a second start finds them"
    assert slot.state().exists
    assert slot.drop() is True
    assert not slot.state().exists
    with logical_engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM pg_publication")).scalar_one() == 0


def test_a_server_without_logical_wal_is_refused_with_what_to_change(
    postgres_engine: Engine,
) -> None:
    with pytest.raises(CdcSetupError, match="ALTER SYSTEM SET wal_level = logical"):
        CdcSlot(postgres_engine).ensure()


def test_a_role_that_may_not_is_refused_with_the_sql_to_run(
    logical_engine: Engine, logical_postgres: LogicalCluster
) -> None:
    """The exact statements a superuser runs, naming the relay's role."""
    database = logical_engine.url.database
    with psycopg.connect(logical_postgres.dsn(database or ""), autocommit=True) as conn:
        conn.execute("DROP ROLE IF EXISTS outbox_plain")
        conn.execute("CREATE ROLE outbox_plain LOGIN")
    plain = create_engine(logical_engine.url.set(username="outbox_plain"))
    try:
        with pytest.raises(CdcSetupError) as refused:
            CdcSlot(plain).ensure()
    finally:
        plain.dispose()
        with psycopg.connect(logical_postgres.dsn("postgres"), autocommit=True) as conn:
            conn.execute("DROP ROLE outbox_plain")
    message = str(refused.value)
    assert "ALTER ROLE outbox_plain WITH REPLICATION;" in message
    assert (
        "CREATE PUBLICATION celery_outbox FOR TABLE celery_outbox WITH (publish = 'insert');"
        in message
    )
    assert "SELECT pg_create_logical_replication_slot('celery_outbox', 'pgoutput');" in message


def test_an_invalidated_slot_ends_the_stream_and_says_so(
    logical_engine: Engine, celery_app: Celery, logical_postgres: LogicalCluster
) -> None:
    """A slot that kept more WAL than max_slot_wal_keep_size is invalidated by the
    server: the relay stops streaming and says why, and polling goes on for the rows."""
    slot = CdcSlot(logical_engine)
    slot.ensure()
    admin = logical_postgres.dsn("postgres")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute("ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'")
        conn.execute("SELECT pg_reload_conf()")
        try:
            conn.execute("CREATE TABLE filler (n integer)")
            for _ in range(4):
                conn.execute("INSERT INTO filler SELECT generate_series(1, 1000)")
                conn.execute("SELECT pg_switch_wal()")
            conn.execute("CHECKPOINT")
            wait_for(lambda: slot.state().invalidated)
        finally:
            conn.execute("DROP TABLE IF EXISTS filler")
            conn.execute("ALTER SYSTEM RESET max_slot_wal_keep_size")
            conn.execute("SELECT pg_reload_conf()")
    relay = CdcRelay(logical_engine, celery_app, slot=slot)
    relay.run()  # returns: nothing to stream from
    assert relay.invalidated.is_set()
    assert not relay.streaming.is_set()


def test_polling_leaves_streamed_rows_only_while_a_stream_beats(
    logical_engine: Engine, celery_app: Celery, redis_client: redis.Redis, queue: str
) -> None:
    """No CDC heartbeat, or one older than cdc_grace: polling publishes everything."""
    with Session(logical_engine) as session:
        task_id = enqueue(session, celery_app, queue, 1)
        session.commit()
    settings = OutboxSettings(cdc_grace=60)
    heartbeat = Heartbeat(logical_engine, store_for(logical_engine), RelayKind.CDC)
    heartbeat.beat(datetime.now(UTC) - timedelta(seconds=61))
    with Relay(logical_engine, celery_app, settings) as poller:
        assert 1 == poller.drain().published
    assert [task_id] == published_ids(redis_client, queue)


def test_a_row_that_fails_on_its_own_goes_to_polling_without_blocking_the_stream(
    logical_engine: Engine,
    celery_app: Celery,
    relays: list[RunningRelay],
    redis_client: redis.Redis,
    queue: str,
) -> None:
    """A row no publish can succeed for (its task is not registered) is recorded as the
    polling relay records a failure (an attempt, the error, a due time backed off), and
    the stream goes on: the rows beside and after it are published, the slot confirmed."""
    relay = start(relays, logical_engine, celery_app)
    wait_for(relay.streaming.is_set)
    now = datetime.now(UTC)
    with Session(logical_engine) as session:
        before = enqueue(session, celery_app, queue, 1)
        session.execute(
            outbox_table.insert().values(
                task_id=uuid.uuid4(),
                task_name="orders.no_such_task",
                args=[],
                kwargs={},
                options={"queue": queue},
                status="pending",
                attempts=0,
                created_at=now,
                available_at=now,
            )
        )
        beside = enqueue(session, celery_app, queue, 2)
        session.commit()
    with Session(logical_engine) as session:
        after = enqueue(session, celery_app, queue, 3)
        session.commit()
    wait_for(lambda: len(published_ids(redis_client, queue)) == 3)
    assert [before, beside, after] == published_ids(redis_client, queue)
    wait_for(lambda: relay.transactions == 2)

    def recorded() -> Any:
        with logical_engine.connect() as conn:
            row = conn.execute(
                select(_t.status, _t.attempts, _t.last_error, _t.available_at).where(
                    _t.task_name == "orders.no_such_task"
                )
            ).one()
        return row if row.attempts else None

    failed = wait_for(recorded)  # written off the publish path
    assert (OutboxStatus.PENDING, 1) == (failed.status, failed.attempts)
    assert "not registered" in failed.last_error
    assert failed.available_at > now


def test_status_metrics_and_health_show_the_slot(
    logical_engine: Engine, celery_app: Celery, relays: list[RunningRelay]
) -> None:
    """The slot's lag in bytes and seconds, and whether a relay streams from it, in
    `outbox status`, the /metrics gauges and the health judgement."""
    relay = start(relays, logical_engine, celery_app)
    wait_for(relay.streaming.is_set)
    stats = collect_stats(logical_engine, datetime.now(UTC))
    assert stats.cdc_slot is not None
    assert stats.cdc_slot.active
    assert stats.cdc_slot.lag_bytes is not None
    assert stats.cdc_slot.lag_seconds is not None
    assert assess(stats).cdc is None
    registry = CollectorRegistry()
    register_outbox_collector(lambda: logical_engine, lambda: datetime.now(UTC), registry)
    assert 1 == registry.get_sample_value("celery_outbox_cdc_slot_active")
    assert registry.get_sample_value("celery_outbox_cdc_slot_lag_bytes") is not None
    assert registry.get_sample_value("celery_outbox_cdc_slot_lag_seconds") is not None
    url = logical_engine.url.render_as_string(hide_password=False)
    shown = CliRunner().invoke(main, ["-A", "tasks", "--database-url", url, "status"])
    assert 0 == shown.exit_code, shown.output
    assert "CDC slot celery_outbox: a CDC relay streams from it; behind by" in shown.output
    app = create_app({"SQLALCHEMY_DATABASE_URI": url})
    try:
        answer = app.test_client().get("/healthz").get_json()
    finally:
        with app.app_context():
            db.engine.dispose()
    assert "ok" == answer["cdc"]
    assert isinstance(answer["cdc_slot_lag_bytes"], int)
    assert isinstance(answer["cdc_slot_lag_seconds"], float)
    relays.pop().stop()
    stats = collect_stats(logical_engine, datetime.now(UTC))
    assert stats.cdc_slot is not None
    assert not stats.cdc_slot.active
    assert stats.cdc_slot.lag_seconds is None


def test_rows_polling_published_while_no_stream_ran_are_not_published_again(
    logical_engine: Engine,
    celery_app: Celery,
    relays: list[RunningRelay],
    redis_client: redis.Redis,
    queue: str,
) -> None:
    """A stream resuming on transactions older than cdc_grace looks their rows up, and
    publishes only those still pending: what polling published while no stream ran goes
    out once."""
    slot = CdcSlot(logical_engine)
    slot.ensure()
    with Session(logical_engine) as session:
        taken = enqueue(session, celery_app, queue, 1)
        session.commit()
    with Relay(logical_engine, celery_app) as poller:
        assert 1 == poller.drain().published, "no stream runs: polling takes everything"
    with Session(logical_engine) as session:
        left = enqueue(session, celery_app, queue, 2)
        session.commit()

    def an_hour_later() -> datetime:
        return datetime.now(UTC) + timedelta(hours=1)

    relay = start(relays, logical_engine, celery_app, clock=an_hour_later)
    wait_for(lambda: relay.transactions == 2)
    assert [taken, left] == published_ids(redis_client, queue)


def test_an_idle_outbox_does_not_pin_wal(
    logical_engine: Engine, celery_app: Celery, relays: list[RunningRelay], queue: str
) -> None:
    """After its last transaction, WAL written for other tables streams nothing to the
    relay, yet the slot's confirmed position follows it: the relay confirms what the
    server says it has sent."""
    relay = start(relays, logical_engine, celery_app)
    wait_for(relay.streaming.is_set)
    with Session(logical_engine) as session:
        enqueue(session, celery_app, queue, 1)
        session.commit()
    wait_for(lambda: relay.transactions == 1)
    with logical_engine.begin() as conn:
        conn.execute(text("CREATE TABLE elsewhere (n integer)"))
    for _ in range(5):
        with logical_engine.begin() as conn:
            conn.execute(text("INSERT INTO elsewhere SELECT generate_series(1, 10000)"))
    with logical_engine.connect() as conn:
        written = parse_lsn(conn.execute(text("SELECT pg_current_wal_lsn()::text")).scalar_one())
    wait_for(lambda: parse_lsn(relay.slot.state().confirmed or "0/0") >= written)
    assert (1, 1) == (relay.published, relay.transactions), "nothing else was streamed"


def test_drop_slot_command(logical_engine: Engine) -> None:
    """`outbox cdc drop-slot` drops the slot and publication, and says what it did."""
    CdcSlot(logical_engine).ensure()
    url = logical_engine.url.render_as_string(hide_password=False)
    args = ["-A", "tasks", "--database-url", url, "cdc", "drop-slot"]
    dropped = CliRunner().invoke(main, args)
    assert 0 == dropped.exit_code, dropped.output
    assert "dropped replication slot celery_outbox and publication celery_outbox\n" == (
        dropped.output
    )
    assert not CdcSlot(logical_engine).state().exists
    again = CliRunner().invoke(main, args)
    assert "no replication slot celery_outbox" in again.output


def test_on_rabbitmq_the_stream_publishes_on_a_confirm_channel(
    logical_engine: Engine, rabbitmq_url: str, relays: list[RunningRelay]
) -> None:
    """The same publisher as the polling relay's: RabbitMQ confirms each message before
    its transaction is confirmed to the slot."""
    queue = f"cdc-confirms-{uuid.uuid4().hex[:8]}"
    app = app_on(rabbitmq_url, "cdc-confirms", task_default_queue=queue, task_queues=None)
    try:
        relay = start(relays, logical_engine, app)
        assert isinstance(relay.publisher, ConfirmingPublisher)
        wait_for(relay.streaming.is_set)
        with Session(logical_engine) as session:
            ids = [
                str(TaskOutbox(app).apply_async(notify_customer, args=(n,), session=session).id)
                for n in range(20)
            ]
            session.commit()
        wait_for(lambda: relay.transactions == 1)
        assert ids == drain_queue(app, queue), "in commit order"
        wait_for(lambda: set(statuses(logical_engine).values()) == {OutboxStatus.DISPATCHED})
    finally:
        with app.connection_for_write() as conn:
            KombuQueue(queue, channel=conn.default_channel).delete()


def test_a_streamed_task_is_the_message_polling_would_publish(
    logical_engine: Engine,
    celery_app: Celery,
    relays: list[RunningRelay],
    redis_client: redis.Redis,
    queue: str,
) -> None:
    """The same row published by the stream and then by the polling relay: one message,
    headers, body and properties alike but for what each publish sets for itself (as two
    apply_async calls would): the delivery tag, the publishing thread's reply address,
    and the time left before the task expires."""
    relay = start(relays, logical_engine, celery_app)
    wait_for(relay.streaming.is_set)
    with Session(logical_engine) as session:
        TaskOutbox(celery_app).apply_async(
            "orders.notify_customer",
            args=(7,),
            kwargs={"event": "confirmed"},
            queue=queue,
            expires=3600,
            headers={"tenant": "acme"},
            session=session,
        )
        session.commit()
    wait_for(lambda: set(statuses(logical_engine).values()) == {OutboxStatus.DISPATCHED})
    relays.pop().stop()  # no stream runs: polling takes every row
    with logical_engine.begin() as conn:
        conn.execute(outbox_table.update().values(status="pending"))
    with Relay(logical_engine, celery_app) as poller:
        assert 1 == poller.drain().published
    streamed, polled = (json.loads(m) for m in reversed(redis_client.lrange(queue, 0, -1)))
    left = [int(m["properties"].pop("expiration")) for m in (streamed, polled)]
    assert all(0 < ms <= 3_600_000 for ms in left)
    for message in (streamed, polled):
        for own in ("delivery_tag", "reply_to"):
            message["properties"].pop(own)
    assert polled == streamed


def test_the_slot_is_never_confirmed_past_what_the_broker_holds(
    logical_engine: Engine,
    celery_app: Celery,
    relays: list[RunningRelay],
    redis_client: redis.Redis,
    queue: str,
) -> None:
    """Transactions stream (some interleaved, some after an ANALYZE that makes the server
    describe the table again, with WAL of another table between them) while every
    publish waits for the test to sample the slot: no sample of the slot's
    confirmed_flush_lsn is past the position the relay confirmed after the broker had
    everything before it."""
    relay, gate = start_gated(relays, logical_engine, celery_app)
    wait_for(relay.streaming.is_set)
    with logical_engine.begin() as conn:
        conn.execute(text("CREATE TABLE elsewhere (n integer)"))
    total = 120
    task_ids: list[str] = []

    def write() -> None:
        for n in range(0, total, 3):
            with Session(logical_engine) as first, Session(logical_engine) as second:
                task_ids.append(enqueue(first, celery_app, queue, n))
                first.flush()
                task_ids.extend(enqueue(second, celery_app, queue, n + k) for k in (1, 2))
                second.commit()
                first.commit()
            with logical_engine.begin() as conn:
                conn.execute(text("INSERT INTO elsewhere SELECT generate_series(1, 200)"))
                if n % 30 == 0:
                    conn.execute(text("ANALYZE celery_outbox"))

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    sampled = threading.Event()
    inner = gate.publisher

    class SampledPublisher:
        """Each publish waits for one sample of the slot taken while it waits."""

        def publish(self, rows: list[Any]) -> Any:
            sampled.clear()
            assert sampled.wait(30), "no sample was taken"
            return inner.publish(rows)

        def close(self) -> None:
            inner.close()

    gate.publisher = SampledPublisher()
    gate.open.set()
    samples = 0
    while len(published_ids(redis_client, queue)) < total or writer.is_alive():
        server = parse_lsn(relay.slot.state().confirmed or "0/0")
        own = relay.confirmed_lsn  # read after the slot's: it only grows
        if relay.transactions:
            assert server <= own, f"slot at {server:X}, relay confirmed {own:X}"
            samples += 1
        sampled.set()
        assert samples < 100_000
    writer.join()
    assert sorted(task_ids) == sorted(published_ids(redis_client, queue))
    assert samples > 0


def test_a_transaction_committed_after_the_grace_is_published_once(
    logical_engine: Engine,
    celery_app: Celery,
    relays: list[RunningRelay],
    redis_client: redis.Redis,
    queue: str,
) -> None:
    """A task enqueued longer than cdc_grace before its transaction commits is polling's
    by the time it commits; the stream, receiving it while polling publishes it, looks
    it up under a lock, finds it taken, and does not publish it again."""
    relay, gate = start_gated(relays, logical_engine, celery_app)
    wait_for(relay.streaming.is_set)
    enqueued = datetime.now(UTC) - timedelta(seconds=2 * relay.settings.cdc_grace)
    task_id = uuid.uuid4()
    with Session(logical_engine) as session:
        session.execute(
            outbox_table.insert().values(
                task_id=task_id,
                task_name="orders.notify_customer",
                args=[1],
                kwargs={},
                options={"queue": queue},
                status="pending",
                attempts=0,
                created_at=enqueued,
                available_at=enqueued,
            )
        )
        session.commit()
    wait_for(gate.entered.is_set)  # received by the stream, not yet published
    with Relay(logical_engine, celery_app) as poller:
        poller.drain()
    gate.open.set()
    wait_for(lambda: relay.transactions == 1)
    wait_for(lambda: statuses(logical_engine) == {str(task_id): OutboxStatus.DISPATCHED})
    assert [str(task_id)] == published_ids(redis_client, queue)
