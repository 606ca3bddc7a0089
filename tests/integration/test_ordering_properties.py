"""Random interleavings of writers, relays and task runs: every key's tasks apply in the
order their transactions committed, and none twice.

A hypothesis state machine drives, on SQLite and on PostgreSQL:

- **writers**, each a transaction of its own in a thread: they enqueue ordered tasks
  into a few keys, several into one transaction, and commit or roll back. A writer may
  enqueue into a key another open transaction holds (on SQLite, while any other writer
  is open): it then waits at its enqueue until that transaction ends, as in production.
  The machine knows who holds what, so it knows who waits, and it waits only for the
  writer it has just let through (a bounded wait, never a sleep);
- **relay runs** (claim, publish to kombu's in-memory broker, mark) and the relays'
  maintenance;
- **task runs** of any published message, in any order, as parallel workers take them:
  a success, a success delivered again later (a duplicate), a retry (Celery runs it
  again), or a failure for good, which blocks the key until it is retried or skipped.

After every step, each key's applied tasks must be a prefix of the tasks committed to it,
in commit order (less the skipped ones), with no task applied twice. At the end,
everything is drained and the applied order must equal the committed order exactly.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pytest
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
from kombu.transport import memory
from sqlalchemy import Engine, create_engine, text

from outbox import (
    OutboxSettings,
    OutboxStatus,
    ProcessedMessage,
    Relay,
    UnblockAction,
    active_keys,
    unblock,
)
from outbox.data.schema import create_tables, keys_table, outbox_table
from tests.ordering_support import FAIL, RETRY, SUCCESS, Consumer, Writer, applied_table
from tests.unit.conftest import drain_queue, memory_app

KEYS = ("order:1", "order:2", "order:3")
processed_table = ProcessedMessage.__table__
#: A run that succeeds while its message stays, to be delivered again later.
DUPLICATE = "duplicate"
#: Open transactions at once, at most.
MAX_WRITERS = 3

PROPERTY_SETTINGS = settings(
    max_examples=25,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


@dataclass
class OpenWriter:
    writer: Writer
    #: Labels enqueued per key, in enqueue order.
    labels: dict[str, list[str]] = field(default_factory=dict)
    #: The lock domain it waits for, if its last enqueue is blocked.
    waiting_for: str | None = None


class OrderingMachine(RuleBasedStateMachine):
    engine: ClassVar[Engine]
    celery_app: ClassVar[Celery]
    consumer: ClassVar[Consumer]
    #: SQLite has one writer at a time: every key shares one lock.
    one_lock: ClassVar[bool]

    def __init__(self) -> None:
        super().__init__()
        memory.Channel.queues.clear()
        with self.engine.begin() as conn:
            for table in (outbox_table, keys_table, processed_table, applied_table):
                conn.execute(table.delete())
        self.relay = Relay(self.engine, self.celery_app, OutboxSettings(batch_size=5))
        self.writers: list[OpenWriter] = []
        #: Which writer holds each lock domain (a key; on SQLite, the database).
        self.holders: dict[str, OpenWriter] = {}
        self.expected: dict[str, list[str]] = {key: [] for key in KEYS}
        self.published: list[dict[str, Any]] = []
        #: The label of each key's task that failed for good, while the key is blocked.
        self.failed: dict[str, str] = {}
        self.labels = (f"t{n}" for n in itertools.count())

    # -- writers ------------------------------------------------------------------

    def domain(self, key: str) -> str:
        return "database" if self.one_lock else key

    def busy(self, key: str) -> bool:
        """Whether an open transaction holds ``key``'s lock (a task run would wait)."""
        return self.domain(key) in self.holders

    @precondition(lambda self: len(self.writers) < MAX_WRITERS)
    @rule(key=st.sampled_from(KEYS))
    def open_a_writer(self, key: str) -> None:
        domain = self.domain(key)
        holder = self.holders.get(domain)
        if holder is not None and any(w.waiting_for == domain for w in self.writers):
            return  # one waiter per lock is enough, and keeps who goes next certain
        opened = OpenWriter(Writer(self.engine, self.celery_app))
        self.writers.append(opened)
        self._enqueue(opened, key)

    @precondition(lambda self: any(w.waiting_for is None for w in self.writers))
    @rule(choice=st.integers(min_value=0), key=st.sampled_from(KEYS))
    def enqueue_more(self, choice: int, key: str) -> None:
        ready = [w for w in self.writers if w.waiting_for is None]
        writer = ready[choice % len(ready)]
        holder = self.holders.get(self.domain(key))
        if holder is not None and holder is not writer:
            return  # a writer that holds locks never waits: no deadlock
        self._enqueue(writer, key)

    def _enqueue(self, opened: OpenWriter, key: str) -> None:
        label = next(self.labels)
        opened.labels.setdefault(key, []).append(label)
        opened.writer.enqueue_task("ordering.apply", (key, label), key)
        domain = self.domain(key)
        holder = self.holders.get(domain)
        if holder is None or holder is opened:
            opened.writer.result()
            self.holders[domain] = opened
        else:
            opened.waiting_for = domain

    @precondition(lambda self: any(w.waiting_for is None for w in self.writers))
    @rule(choice=st.integers(min_value=0), commit=st.booleans())
    def end_a_writer(self, choice: int, commit: bool) -> None:
        ready = [w for w in self.writers if w.waiting_for is None]
        self._end(ready[choice % len(ready)], commit)

    def _end(self, opened: OpenWriter, commit: bool) -> None:
        writer = opened.writer
        writer.submit(writer.conn.commit if commit else writer.conn.rollback)
        writer.result()
        if commit:
            for key, labels in opened.labels.items():
                self.expected[key].extend(labels)
        writer.close()
        self.writers.remove(opened)
        for domain in [d for d, holder in self.holders.items() if holder is opened]:
            del self.holders[domain]
            for waiter in self.writers:
                if waiter.waiting_for == domain:
                    waiter.writer.result()  # its enqueue goes through now
                    waiter.waiting_for = None
                    self.holders[domain] = waiter

    # -- relays and workers -------------------------------------------------------

    def nothing_locked(self) -> bool:
        return not self.one_lock or not self.holders

    @precondition(lambda self: self.nothing_locked())
    @rule()
    def run_the_relay(self) -> None:
        self.relay.drain(maintain=False)
        self.published.extend(drain_queue(self.celery_app))

    @precondition(lambda self: not self.holders)
    @rule()
    def maintain(self) -> None:
        self.relay.maintain()

    @precondition(lambda self: self.published and self.nothing_locked())
    @rule(
        choice=st.integers(min_value=0),
        outcome=st.sampled_from([SUCCESS, SUCCESS, DUPLICATE, RETRY, FAIL]),
    )
    def run_a_task(self, choice: int, outcome: str) -> None:
        message = self.published[choice % len(self.published)]
        key, label = message["body"][0]
        if self.busy(key):
            return  # its hand-over would wait for that transaction: a worker would too
        state = self.consumer.run(message, SUCCESS if outcome == DUPLICATE else outcome)
        if outcome in (SUCCESS, FAIL):
            self.published.remove(message)  # a duplicate or a retry comes again
        if state == "FAILURE":
            self.failed[key] = label

    @precondition(lambda self: self.failed and not self.holders)
    @rule(choice=st.integers(min_value=0), retry=st.booleans())
    def resolve_a_blocked_key(self, choice: int, retry: bool) -> None:
        keys = sorted(self.failed)
        key = keys[choice % len(keys)]
        action = UnblockAction.RETRY if retry else UnblockAction.SKIP
        with self.engine.begin() as conn:
            unblock(conn, key, action, self.relay.now())
        label = self.failed.pop(key)
        if action == UnblockAction.SKIP:
            self.expected[key].remove(label)

    # -- the property -------------------------------------------------------------

    @invariant()
    def applied_in_commit_order_and_once(self) -> None:
        applied = self.consumer.applied()
        for key in KEYS:
            done = applied.get(key, [])
            assert len(done) == len(set(done)), f"{key}: applied twice: {done}"
            assert done == self.expected[key][: len(done)], (
                f"{key}: applied {done}, committed in the order {self.expected[key]}"
            )

    def teardown(self) -> None:
        try:
            while self.writers:
                ready = [w for w in self.writers if w.waiting_for is None]
                self._end(ready[0], commit=True)
            for _ in range(200):
                self.run_the_relay()
                if not self.published and not self.failed and self._settled():
                    break
                for message in list(reversed(self.published)):
                    self.consumer.run(message)
                    self.published.remove(message)
                for key in list(self.failed):
                    with self.engine.begin() as conn:
                        unblock(conn, key, UnblockAction.RETRY, self.relay.now())
                    del self.failed[key]
            assert self._settled(), "everything committed was applied"
            applied = self.consumer.applied()
            for key in KEYS:
                assert applied.get(key, []) == self.expected[key], key
        finally:
            for opened in self.writers:
                opened.writer.close()

    def _settled(self) -> bool:
        with self.engine.connect() as conn:
            waiting = conn.execute(
                text("SELECT count(*) FROM celery_outbox WHERE status IN (:pending, :held)"),
                {"pending": OutboxStatus.PENDING.value, "held": OutboxStatus.HELD.value},
            ).scalar_one()
            blocked = active_keys(conn, blocked_only=True)
        return not waiting and not blocked


@pytest.fixture
def sqlite_engine(tmp_path: Path) -> Iterator[Engine]:
    engine = create_engine(
        f"sqlite:///{tmp_path / 'ordering.sqlite3'}", connect_args={"timeout": 60}
    )
    create_tables(engine)
    yield engine
    engine.dispose()


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_every_key_applies_in_commit_order_and_never_twice(
    database: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The broker here is kombu's in-memory one: not the run's Redis, which Celery would
    # take from the environment over the app's own setting.
    monkeypatch.delenv("CELERY_BROKER_URL", raising=False)
    monkeypatch.delenv("CELERY_RESULT_BACKEND", raising=False)
    engine: Engine = request.getfixturevalue("sqlite_engine" if database == "sqlite" else "engine")
    celery_app = memory_app(f"ordering-{database}")
    consumer = Consumer(engine, celery_app)
    consumer.register()
    machine = type(
        f"OrderingOn{database.title()}",
        (OrderingMachine,),
        {
            "engine": engine,
            "celery_app": celery_app,
            "consumer": consumer,
            "one_lock": database == "sqlite",
        },
    )
    try:
        run_state_machine_as_test(machine, settings=PROPERTY_SETTINGS)
    finally:
        consumer.close()
        with engine.begin() as conn:
            applied_table.drop(conn, checkfirst=True)
