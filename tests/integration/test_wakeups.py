"""Committing writers notify only while a relay waits, and no committed row goes unnoticed.

The relay's side of the protocol (``outbox.postgres.wakeups.WakeupGate``) is driven step by step
against real PostgreSQL transactions, so each interleaving of a writer's read of the
relay's state, its commit, and the relay's announcement and checks happens in a known
order. A hypothesis state machine then tries random interleavings of several writers and
the relay's steps, and checks after every step that a relay that would sleep now has no
committed row left unnoticed: every one is drained, or its notification has arrived.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
import redis
from celery import Celery
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import (
    Connection,
    Engine,
    create_engine,
    delete,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.orm import Session

from outbox import OutboxStatus, Relay, TaskOutbox
from outbox.data.schema import (
    NOTIFY_CHANNEL,
    WAITING_SEQUENCE,
    create_tables,
    listeners_table,
    outbox_table,
)
from outbox.postgres.wakeups import WakeupGate, listening_connection
from outbox.relays.loop import RelayLoop
from tests.services import wait_for

pytestmark = pytest.mark.postgresql

_t = outbox_table.c
#: How long a notification may take to reach the listening connection after the commit
#: that sent it (a bound on a wait for a signal, not a delay).
NOTIFICATION_TIMEOUT = 5.0
MARKER = "marker"


@pytest.fixture
def listeners(postgres_engine: Engine) -> Iterator[None]:
    """No listener rows but the test's own (a relay of an earlier test may have left one),
    and a count of waiting listeners to match."""
    clear_listeners(postgres_engine)
    yield
    clear_listeners(postgres_engine)


def clear_listeners(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(delete(listeners_table))
        conn.exec_driver_sql(f"SELECT setval('{WAITING_SEQUENCE}', 0, true)")


class Listener:
    """A relay's listening connection and its gate, as ``RelayLoop`` sets them up."""

    def __init__(self, engine: Engine, celery_app: Celery) -> None:
        self.relay = Relay(engine, celery_app)
        self.conn = listening_connection(engine, NOTIFY_CHANNEL)
        self.gate = WakeupGate(self.conn, lambda: self.relay.has_due_rows(self.conn))
        self.gate.register()

    def notifications(self, timeout: float = 0) -> int:
        """How many notifications have arrived (waiting up to ``timeout`` for the first)."""
        driver = self.conn.connection.dbapi_connection
        assert driver is not None
        first = sum(1 for _ in driver.notifies(timeout=timeout, stop_after=1))
        return first + sum(1 for _ in driver.notifies(timeout=0)) if first else 0

    def notified_since(self, engine: Engine) -> int:
        """How many notifications of commits made so far have arrived, waiting for all of
        them: a marker notification is sent now, and PostgreSQL delivers notifications in
        commit order, so once the marker is here every earlier one is too."""
        with engine.begin() as conn:
            conn.execute(select(func.pg_notify(NOTIFY_CHANNEL, MARKER)))
        driver = self.conn.connection.dbapi_connection
        assert driver is not None
        count = 0
        for notice in driver.notifies(timeout=NOTIFICATION_TIMEOUT):
            if notice.payload == MARKER:
                return count
            count += 1
        raise AssertionError(f"the marker notification did not arrive: {count} others did")

    def close(self) -> None:
        self.conn.close()
        self.relay.close()


@pytest.fixture
def listener(postgres_engine: Engine, celery_app: Celery, listeners: None) -> Iterator[Listener]:
    listener = Listener(postgres_engine, celery_app)
    yield listener
    listener.close()


class Writer:
    """One application transaction, opened and ended when the test says."""

    def __init__(self, engine: Engine) -> None:
        self.conn: Connection = engine.connect()

    def insert(self) -> None:
        """Insert one pending row (the trigger reads the relay's state now)."""
        if not self.conn.in_transaction():
            self.conn.begin()
        now = datetime.now(UTC)
        self.conn.execute(
            insert(outbox_table).values(
                task_id=uuid.uuid4(),
                task_name="orders.notify_customer",
                args=[1],
                kwargs={},
                options={},
                status=OutboxStatus.PENDING,
                attempts=0,
                created_at=now,
                available_at=now,
            )
        )

    def commit(self) -> None:
        self.conn.commit()

    def rollback(self) -> None:
        self.conn.rollback()

    @property
    def open(self) -> bool:
        return self.conn.in_transaction()

    def close(self) -> None:
        self.conn.close()


@pytest.fixture
def writer(postgres_engine: Engine) -> Iterator[Writer]:
    writer = Writer(postgres_engine)
    yield writer
    writer.close()


def pending(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(select(func.count()).where(_t.status == OutboxStatus.PENDING)).scalar_one()
        )


def drain(engine: Engine) -> None:
    """What a relay's drain does to the rows, without a broker."""
    with engine.begin() as conn:
        conn.execute(
            update(outbox_table)
            .where(_t.status == OutboxStatus.PENDING)
            .values(status=OutboxStatus.DISPATCHED)
        )


def waiting_rows(engine: Engine) -> list[bool]:
    with engine.connect() as conn:
        return list(conn.execute(select(listeners_table.c.waiting)).scalars())


def test_a_writer_notifies_only_while_a_relay_waits(
    listener: Listener, writer: Writer, postgres_engine: Engine
) -> None:
    assert [False] == waiting_rows(postgres_engine)
    writer.insert()
    writer.commit()
    assert listener.gate.announce() is True, "the row committed before is found"
    drain(postgres_engine)
    assert [True] == waiting_rows(postgres_engine)
    writer.insert()
    writer.commit()
    assert listener.notified_since(postgres_engine) == 1
    listener.gate.stand_down()
    writer.insert()
    writer.commit()
    assert listener.notified_since(postgres_engine) == 0
    listener.gate.announce()
    writer.insert()
    writer.commit()
    assert listener.notified_since(postgres_engine) == 1


def test_a_row_committed_before_the_announcement_is_found_by_its_check(
    listener: Listener, writer: Writer, postgres_engine: Engine
) -> None:
    writer.insert()
    writer.commit()
    assert listener.gate.announce() is True
    assert listener.gate.in_flight == frozenset()
    assert listener.notified_since(postgres_engine) == 0


def test_a_writer_that_read_the_old_state_is_found_once_it_commits(
    listener: Listener, writer: Writer, postgres_engine: Engine
) -> None:
    """The writer inserted (and read "nobody waits") before the announcement, and commits
    after its check: the relay keeps it listed, and checks again once it has ended."""
    writer.insert()
    assert listener.gate.announce() is False, "its row is not visible yet"
    assert len(listener.gate.in_flight) == 1
    assert listener.gate.settle() is False, "still in its transaction"
    assert len(listener.gate.in_flight) == 1
    writer.commit()
    assert listener.notified_since(postgres_engine) == 0, "it read the old state"
    assert listener.gate.settle() is True
    assert listener.gate.in_flight == frozenset()


def test_a_writer_that_rolls_back_leaves_nothing_to_find(
    listener: Listener, writer: Writer
) -> None:
    writer.insert()
    assert listener.gate.announce() is False
    writer.rollback()
    assert listener.gate.settle() is False
    assert listener.gate.in_flight == frozenset()


def test_a_writer_that_inserts_after_the_announcement_notifies(
    listener: Listener, writer: Writer, postgres_engine: Engine
) -> None:
    assert listener.gate.announce() is False
    writer.insert()
    assert len(listener.gate.in_flight) == 0, "listed only if it was there at the check"
    writer.commit()
    assert listener.notified_since(postgres_engine) == 1


def test_the_row_of_a_listener_gone_is_forgotten(
    postgres_engine: Engine, celery_app: Celery, listeners: None, writer: Writer
) -> None:
    """A relay killed while it waited leaves its row; the next listener deletes it, and
    writers stop notifying for it."""
    gone = Listener(postgres_engine, celery_app)
    gone.gate.announce()
    pid = gone.gate.pid
    gone.close()  # the connection ends without the row being removed, as in a SIGKILL
    assert [True] == waiting_rows(postgres_engine)
    # Its server process ends a moment after the connection closes.
    wait_for(lambda: not backend_alive(postgres_engine, pid))
    other = Listener(postgres_engine, celery_app)
    try:
        assert [False] == waiting_rows(postgres_engine), "only the new listener's row"
        writer.insert()
        writer.commit()
        assert other.notified_since(postgres_engine) == 0, "nobody waited at its commit"
    finally:
        other.close()


def waiting_count(engine: Engine) -> int | None:
    """What the trigger's WHEN reads: the sequence the relays keep."""
    with engine.connect() as conn:
        value = conn.execute(text(f"SELECT pg_sequence_last_value('{WAITING_SEQUENCE}')"))
        return value.scalar_one()


def test_the_sequence_counts_the_waiting_listeners(
    postgres_engine: Engine, celery_app: Celery, listeners: None, writer: Writer
) -> None:
    """Each relay's announcement, stand-down, exit or death moves the one value writers
    read, so it says how many relays wait whatever the others do meanwhile."""
    first = Listener(postgres_engine, celery_app)
    second = Listener(postgres_engine, celery_app)
    try:
        assert 0 == waiting_count(postgres_engine)
        first.gate.announce()
        second.gate.announce()
        assert 2 == waiting_count(postgres_engine)
        second.gate.stand_down()
        assert 1 == waiting_count(postgres_engine)
        second.gate.unregister()
        first.gate.announce()
        assert 1 == waiting_count(postgres_engine)
        pid = first.gate.pid
        first.conn.close()  # dies waiting: its row and the count stay behind
        wait_for(lambda: not backend_alive(postgres_engine, pid))
        assert 1 == waiting_count(postgres_engine)
        assert 1 == second.gate.forget_gone()
        assert 0 == waiting_count(postgres_engine)
        writer.insert()
        writer.commit()
        assert 0 == second.notified_since(postgres_engine), "nobody waits any more"
    finally:
        first.close()
        second.close()


def test_create_tables_brings_an_earlier_wakeup_trigger_up_to_date(
    postgres_engine: Engine, listener: Listener, writer: Writer
) -> None:
    """The trigger an earlier version made (a function reading the listeners' table on
    every INSERT) is replaced, and the count set from the rows of relays waiting now."""
    listener.gate.announce()
    with postgres_engine.begin() as conn:
        conn.exec_driver_sql("DROP TRIGGER celery_outbox_notify ON celery_outbox")
        conn.exec_driver_sql(
            "CREATE TRIGGER celery_outbox_notify AFTER INSERT ON celery_outbox"
            " FOR EACH STATEMENT EXECUTE FUNCTION celery_outbox_notify()"
        )
        conn.exec_driver_sql(f"SELECT setval('{WAITING_SEQUENCE}', 0, true)")
    create_tables(postgres_engine)
    with postgres_engine.connect() as conn:
        definition = conn.exec_driver_sql(
            "SELECT pg_get_triggerdef(oid) FROM pg_trigger WHERE tgname = 'celery_outbox_notify'"
        ).scalar_one()
    assert f"WHEN ((pg_sequence_last_value('{WAITING_SEQUENCE}'::regclass) > 0))" in definition
    assert 1 == waiting_count(postgres_engine)
    writer.insert()
    writer.commit()
    assert 1 == listener.notified_since(postgres_engine)


def backend_alive(engine: Engine, pid: int | None) -> bool:
    with engine.connect() as conn:
        return bool(
            conn.exec_driver_sql(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = %(pid)s", {"pid": pid}
            ).scalar_one()
        )


@pytest.fixture
def role_engines(postgres_engine: Engine, listeners: None) -> Iterator[tuple[Engine, Engine]]:
    """Engines on this run's database as two roles of their own, neither superuser nor in
    ``pg_read_all_stats``, with the rights a relay needs; the roles are dropped after."""
    roles = [f"outbox_relay_{uuid.uuid4().hex[:8]}" for _ in range(2)]
    with postgres_engine.begin() as conn:
        for role in roles:
            conn.exec_driver_sql(f'CREATE ROLE "{role}" LOGIN')
            conn.exec_driver_sql(f'GRANT ALL ON ALL TABLES IN SCHEMA public TO "{role}"')
            conn.exec_driver_sql(f'GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO "{role}"')
    engines = [create_role_engine(postgres_engine, role) for role in roles]
    try:
        yield engines[0], engines[1]
    finally:
        for engine in engines:
            engine.dispose()
        with postgres_engine.begin() as conn:
            for role in roles:
                conn.exec_driver_sql(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s",
                    (role,),
                )
                conn.exec_driver_sql(f'DROP OWNED BY "{role}"')
                conn.exec_driver_sql(f'DROP ROLE "{role}"')


def create_role_engine(engine: Engine, role: str) -> Engine:
    return create_engine(engine.url.set(username=role, password=None))


def listener_pids(engine: Engine) -> list[int]:
    with engine.connect() as conn:
        return sorted(conn.execute(select(listeners_table.c.pid)).scalars())


def test_listeners_of_other_roles_stay_registered(
    role_engines: tuple[Engine, Engine], celery_app: Celery, postgres_engine: Engine
) -> None:
    """A role that cannot read other roles' session details (no ``pg_read_all_stats``)
    still sees their listeners alive: each relay's pruning keeps the other's row."""
    first = Listener(role_engines[0], celery_app)
    second = Listener(role_engines[1], celery_app)  # registering prunes the gone
    try:
        hidden = text("SELECT backend_start FROM pg_stat_activity WHERE pid = :pid")
        assert None is first.conn.execute(hidden, {"pid": second.gate.pid}).scalar_one()
        first.gate.announce()
        second.gate.announce()
        assert 0 == first.gate.forget_gone()
        assert 0 == second.gate.forget_gone()
        assert sorted([first.gate.pid, second.gate.pid]) == listener_pids(postgres_engine)
        assert 2 == waiting_count(postgres_engine)
    finally:
        first.close()
        second.close()


def test_a_gone_listener_of_another_role_is_forgotten(
    role_engines: tuple[Engine, Engine], celery_app: Celery, postgres_engine: Engine
) -> None:
    """The row of another role's relay whose connection ended is still deleted, and so
    is a row naming a live session that is not listening (its pid reused)."""
    gone = Listener(role_engines[0], celery_app)
    gone.gate.announce()
    pid = gone.gate.pid
    gone.close()
    wait_for(lambda: not backend_alive(postgres_engine, pid))
    other = Listener(role_engines[1], celery_app)
    try:
        assert [other.gate.pid] == listener_pids(postgres_engine)
        with role_engines[0].connect() as reused:
            # A session of the first role that never listened, under a dead listener's
            # row: what a pid handed to a new connection looks like.
            reused_pid = reused.execute(select(func.pg_backend_pid())).scalar_one()
            with postgres_engine.begin() as conn:
                conn.execute(
                    insert(listeners_table).values(
                        pid=reused_pid,
                        backend_start=datetime.now(UTC) - timedelta(days=1),
                        relay="reused",
                        waiting=True,
                        updated_at=datetime.now(UTC),
                    )
                )
            assert 1 == other.gate.forget_gone()
            assert [other.gate.pid] == listener_pids(postgres_engine)
    finally:
        other.close()


class WakeupMachine(RuleBasedStateMachine):
    """Writers and one relay's steps in any order. The relay moves as ``RelayLoop`` does:
    active (draining, not waiting) or listening (announced, settling its in-flight
    writers, woken by notifications, or standing down when busy)."""

    engine: Engine
    celery_app: Celery
    WRITERS = 3

    def __init__(self) -> None:
        super().__init__()
        with self.engine.begin() as conn:
            conn.execute(delete(outbox_table))
        clear_listeners(self.engine)
        self.listener = Listener(self.engine, self.celery_app)
        self.writers = [Writer(self.engine) for _ in range(self.WRITERS)]
        self.listening = False
        #: Notifications read off the connection and not yet acted on.
        self.arrived = 0

    def teardown(self) -> None:
        for writer in self.writers:
            writer.close()
        self.listener.close()

    @rule(index=st.integers(0, WRITERS - 1))
    def writer_inserts(self, index: int) -> None:
        self.writers[index].insert()

    @rule(index=st.integers(0, WRITERS - 1), commit=st.booleans())
    def writer_ends(self, index: int, commit: bool) -> None:
        writer = self.writers[index]
        if writer.open:
            writer.commit() if commit else writer.rollback()

    @precondition(lambda self: not self.listening)
    @rule()
    def relay_drains(self) -> None:
        drain(self.engine)

    @precondition(lambda self: not self.listening)
    @rule()
    def relay_announces(self) -> None:
        self.listening = True
        if self.listener.gate.announce():
            drain(self.engine)

    @precondition(lambda self: self.listening and self.listener.gate.in_flight)
    @rule()
    def relay_settles(self) -> None:
        if self.listener.gate.settle():
            drain(self.engine)

    @precondition(lambda self: self.listening)
    @rule()
    def relay_is_woken(self) -> None:
        self.arrived += self.listener.notifications()
        if self.arrived:
            self.arrived = 0
            drain(self.engine)

    @precondition(lambda self: self.listening)
    @rule()
    def relay_stands_down(self) -> None:
        self.listener.gate.stand_down()
        self.listening = False

    @invariant()
    def a_sleeping_relay_has_nothing_unnoticed(self) -> None:
        if not self.listening or self.listener.gate.in_flight or self.arrived:
            return
        if pending(self.engine):
            # Committed rows the relay has not drained: a notification must be on its way.
            self.arrived += self.listener.notifications(NOTIFICATION_TIMEOUT)
            assert self.arrived, "a committed row waits, and nothing will wake the relay"


def test_no_interleaving_leaves_a_committed_row_unnoticed(
    postgres_engine: Engine, celery_app: Celery, listeners: None
) -> None:
    WakeupMachine.engine = postgres_engine
    WakeupMachine.celery_app = celery_app
    run_state_machine_as_test(
        WakeupMachine,
        settings=settings(
            max_examples=40,
            stateful_step_count=30,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )


def test_a_busy_relay_stands_down_and_waits_again_once_calm(
    postgres_engine: Engine, celery_app: Celery, listeners: None, redis_client: redis.Redis
) -> None:
    """A drain that finds a backlog (more than one batch) stands the relay down: writers
    stop notifying, and the relay looks for rows itself; once no rows come, it waits on
    LISTEN again."""
    relay = Relay(postgres_engine, celery_app)
    loop = RelayLoop(relay, poll_interval=600)
    thread = threading.Thread(target=loop.run, daemon=True)
    thread.start()
    queue = "wakeup-test"
    try:
        wait_for(lambda: waiting_rows(postgres_engine) == [True])
        assert loop.stand_downs == 0
        with Session(postgres_engine) as session:
            for number in range(relay.settings.batch_size * 2):
                TaskOutbox(celery_app).apply_async(
                    "orders.notify_customer", args=(number,), queue=queue, session=session
                )
            session.commit()
        wait_for(lambda: pending(postgres_engine) == 0)
        # The drain's last batch commits before the loop hears how the drain went.
        wait_for(lambda: loop.stand_downs >= 1)
        assert loop.stand_downs == 1, "it stood down once on finding a backlog"
        # No rows come any more: it waits on LISTEN again, and a commit wakes it.
        wait_for(lambda: waiting_rows(postgres_engine) == [True])
        woken = loop.wakeups["notified"] + loop.wakeups["found"]
        with Session(postgres_engine) as session:
            TaskOutbox(celery_app).apply_async(
                "orders.notify_customer", args=(0,), queue=queue, session=session
            )
            session.commit()
        wait_for(lambda: pending(postgres_engine) == 0)
        # Its notification, or, when the commit lands while the relay announces itself,
        # the look for due rows that follows the announcement: never the poll (600 s).
        assert loop.wakeups["notified"] + loop.wakeups["found"] == woken + 1
        assert loop.wakeups["timeout"] == 0
    finally:
        loop.stop()
        thread.join(timeout=10)
        redis_client.delete(queue)
    assert not thread.is_alive()
    assert waiting_rows(postgres_engine) == [], "a relay that stops removes its row"


def test_writers_of_delayed_rows_stand_a_listening_relay_down(
    postgres_engine: Engine, celery_app: Celery, listeners: None
) -> None:
    """Rows not yet due publish nothing, but each commit would notify the waiting relay:
    it counts the rows inserted (the table's id sequence) as well as those it publishes,
    stands down while writers insert fast, and waits on LISTEN again once they stop."""
    relay = Relay(postgres_engine, celery_app)
    loop = RelayLoop(relay, poll_interval=600)
    thread = threading.Thread(target=loop.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: waiting_rows(postgres_engine) == [True])
        later = datetime.now(UTC) + timedelta(hours=1)
        inserted = 0
        # Writers keep inserting, 100 rows a commit, until the relay has seen enough of
        # them (a window of its rates is 0.1 s): bounded by a count, not a time.
        for _ in range(2000):
            with postgres_engine.begin() as conn:
                conn.execute(insert(outbox_table), [delayed_row(later) for _ in range(100)])
            inserted += 100
            if loop.stand_downs:
                break
        assert 1 == loop.stand_downs
        assert inserted == still_pending(postgres_engine, later), "nothing was due"
        wait_for(lambda: waiting_rows(postgres_engine) == [True])
        assert 1 == waiting_count(postgres_engine), "writers notify again"
    finally:
        loop.stop()
        thread.join(timeout=10)
    assert not thread.is_alive()


def delayed_row(available_at: datetime) -> dict[str, object]:
    return {
        "task_id": uuid.uuid4(),
        "task_name": "orders.notify_customer",
        "args": [1],
        "kwargs": {},
        "options": {},
        "status": OutboxStatus.PENDING,
        "attempts": 0,
        "created_at": datetime.now(UTC),
        "available_at": available_at,
    }


def still_pending(engine: Engine, available_at: datetime) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(
                select(func.count())
                .where(_t.status == OutboxStatus.PENDING)
                .where(_t.available_at == available_at)
            ).scalar_one()
        )
