"""Per-key ordering on SQLite: one task of a key at a time, in commit order."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from celery import Celery
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from outbox import (
    InvalidOrderingKeyError,
    KeyNotBlockedError,
    OrderingNotTrackedError,
    OutboxSettings,
    OutboxStatus,
    ProcessedMessage,
    Relay,
    TaskOutbox,
    UnblockAction,
    active_keys,
    collect_stats,
    outbox_table,
    retry_dead,
    unblock,
)
from outbox.consumers.lifecycle import LifecycleTracker
from outbox.maintenance.retention import purge_idle_keys, purge_outbox
from outbox.ordering.keys import MAX_KEY_LENGTH
from tests.ordering_support import FAIL, RETRY, Consumer, labels, place
from tests.unit.conftest import FakeClock, count_rows, drain_queue


@pytest.fixture
def consumer(engine: Engine, celery_app: Celery) -> Iterator[Consumer]:
    consumer = Consumer(engine, celery_app)
    consumer.register()
    yield consumer
    consumer.close()


def enqueue(tasks: TaskOutbox, session: Session, key: str, *names: str) -> None:
    """One transaction per task, committed in the order given."""
    for name in names:
        tasks.ordered(key).delay("ordering.apply", key, name)
        session.commit()


def published(relay: Relay, celery_app: Celery) -> list[dict[str, object]]:
    relay.drain(maintain=False)
    return drain_queue(celery_app)


def fail_paid(
    tasks: TaskOutbox, session: Session, relay: Relay, celery_app: Celery, consumer: Consumer
) -> dict[str, object]:
    """paid, then shipped, for order 1; paid fails for good. Returns paid's message."""
    enqueue(tasks, session, "order:1", "paid", "shipped")
    [paid] = published(relay, celery_app)
    assert "FAILURE" == consumer.run(paid, FAIL)
    return paid


def kill_paid(tasks: TaskOutbox, session: Session, relay: Relay, celery_app: Celery) -> None:
    """paid, then shipped, for order 1; paid cannot be published and goes dead (the relay
    has ``max_attempts=1``), which its next maintenance sees."""
    enqueue(tasks, session, "order:1", "paid", "shipped")
    registered = celery_app.tasks.pop("ordering.apply")  # a deploy that dropped the task
    relay.drain(maintain=False)
    celery_app.tasks["ordering.apply"] = registered
    relay.maintain()


def test_a_keys_tasks_are_published_one_at_a_time_each_after_the_last_finished(
    tasks: TaskOutbox, session: Session, relay: Relay, celery_app: Celery, consumer: Consumer
) -> None:
    enqueue(tasks, session, "order:1", "paid", "shipped", "delivered")
    assert 2 == count_rows(relay.engine, status=OutboxStatus.HELD)
    seen = []
    for _ in range(3):
        [message] = published(relay, celery_app)
        assert [] == published(relay, celery_app), "nothing more until this one finishes"
        seen += labels([message])
        assert "SUCCESS" == consumer.run(message)
    assert ["paid", "shipped", "delivered"] == seen
    assert {"order:1": ["paid", "shipped", "delivered"]} == consumer.applied()
    assert [] == active_keys(session.connection()), "the key is idle again"


def test_other_keys_and_unordered_tasks_go_in_parallel(
    tasks: TaskOutbox, session: Session, relay: Relay, celery_app: Celery, consumer: Consumer
) -> None:
    enqueue(tasks, session, "order:1", "a1", "a2")
    enqueue(tasks, session, "order:2", "b1", "b2")
    tasks.delay("unit.add", 1, 2)
    tasks.delay("unit.add", 3, 4)
    session.commit()
    messages = published(relay, celery_app)
    assert 4 == len(messages), "each key's first task and every unordered one"
    assert {("order:1", 1), ("order:2", 1), None} == {place(m) for m in messages}


def test_a_rolled_back_enqueue_leaves_no_gap_in_the_line(
    tasks: TaskOutbox, session: Session, relay: Relay, celery_app: Celery, consumer: Consumer
) -> None:
    enqueue(tasks, session, "order:1", "first")
    tasks.ordered("order:1").delay("ordering.apply", "order:1", "rolled back")
    session.rollback()
    enqueue(tasks, session, "order:1", "second")
    for expected in ("first", "second"):
        [message] = published(relay, celery_app)
        assert [expected] == labels([message])
        consumer.run(message)
    assert {"order:1": ["first", "second"]} == consumer.applied()


def test_tasks_enqueued_in_one_transaction_keep_their_order(
    tasks: TaskOutbox, session: Session, relay: Relay, celery_app: Celery, consumer: Consumer
) -> None:
    for label in ("one", "two", "three"):
        tasks.apply_async("ordering.apply", ("order:9", label), ordering_key="order:9")
    session.commit()
    for _ in range(3):
        [message] = published(relay, celery_app)
        consumer.run(message)
    assert {"order:9": ["one", "two", "three"]} == consumer.applied()


def test_a_retried_task_keeps_its_key_until_it_finishes(
    tasks: TaskOutbox, session: Session, relay: Relay, celery_app: Celery, consumer: Consumer
) -> None:
    enqueue(tasks, session, "order:1", "paid", "shipped")
    [paid] = published(relay, celery_app)
    assert "RETRY" == consumer.run(paid, RETRY)
    assert [] == published(relay, celery_app), "shipped waits for the retried task"
    consumer.run(paid)
    [shipped] = published(relay, celery_app)
    consumer.run(shipped)
    assert {"order:1": ["paid", "shipped"]} == consumer.applied()


def test_a_repeated_delivery_does_not_let_the_next_task_overtake(
    tasks: TaskOutbox, session: Session, relay: Relay, celery_app: Celery, consumer: Consumer
) -> None:
    enqueue(tasks, session, "order:1", "paid", "shipped", "delivered")
    [paid] = published(relay, celery_app)
    consumer.run(paid)
    [shipped] = published(relay, celery_app)
    consumer.run(paid)  # a late duplicate of the first task
    assert [] == published(relay, celery_app), "delivered still waits for shipped"
    consumer.run(shipped)
    [delivered] = published(relay, celery_app)
    assert ["delivered"] == labels([delivered])


def test_a_failed_task_blocks_its_key_by_default_and_says_so(
    tasks: TaskOutbox,
    session: Session,
    relay: Relay,
    celery_app: Celery,
    consumer: Consumer,
    clock: FakeClock,
) -> None:
    paid = fail_paid(tasks, session, relay, celery_app, consumer)
    relay.maintain()
    assert [] == published(relay, celery_app), "shipped waits for a person"
    [blocked] = active_keys(session.connection(), blocked_only=True)
    session.rollback()
    assert blocked.blocked_at is not None
    stats = collect_stats(relay.engine, blocked.blocked_at + timedelta(seconds=30))
    assert (1, 30.0) == (stats.blocked_keys, stats.oldest_blocked_age_seconds)
    assert 1 == blocked.held
    assert ("order:1", 1, "TaskFailedError: paid") == (
        blocked.key,
        blocked.head_seq,
        blocked.blocked_reason,
    )
    assert str(paid["headers"]["id"]) == blocked.task_id


def test_unblock_retry_runs_the_failed_task_again_then_the_key_goes_on(
    tasks: TaskOutbox,
    session: Session,
    relay: Relay,
    celery_app: Celery,
    consumer: Consumer,
    clock: FakeClock,
) -> None:
    paid = fail_paid(tasks, session, relay, celery_app, consumer)
    with relay.engine.begin() as conn:
        unblock(conn, "order:1", UnblockAction.RETRY, clock.now)
    [again] = published(relay, celery_app)
    assert paid["headers"]["id"] == again["headers"]["id"], "the same task id"
    assert "SUCCESS" == consumer.run(again)
    [shipped] = published(relay, celery_app)
    consumer.run(shipped)
    assert {"order:1": ["paid", "shipped"]} == consumer.applied()


def test_unblock_skip_lets_the_next_task_go(
    tasks: TaskOutbox,
    session: Session,
    relay: Relay,
    celery_app: Celery,
    consumer: Consumer,
    clock: FakeClock,
) -> None:
    fail_paid(tasks, session, relay, celery_app, consumer)
    with relay.engine.begin() as conn:
        unblock(conn, "order:1", UnblockAction.SKIP, clock.now)
    [shipped] = published(relay, celery_app)
    consumer.run(shipped)
    assert {"order:1": ["shipped"]} == consumer.applied()
    assert 0 == collect_stats(relay.engine, clock.now).blocked_keys


def test_unblock_refuses_a_key_that_is_not_blocked(
    tasks: TaskOutbox, session: Session, relay: Relay, clock: FakeClock, consumer: Consumer
) -> None:
    enqueue(tasks, session, "order:1", "paid")
    with relay.engine.begin() as conn:
        with pytest.raises(KeyNotBlockedError, match="not blocked"):
            unblock(conn, "order:1", UnblockAction.SKIP, clock.now)
        with pytest.raises(KeyNotBlockedError, match="no task waiting"):
            unblock(conn, "order:unknown", UnblockAction.RETRY, clock.now)


def test_on_failure_skip_hands_the_key_on_at_the_relays_next_maintenance(
    tasks: TaskOutbox,
    session: Session,
    engine: Engine,
    celery_app: Celery,
    consumer: Consumer,
    clock: FakeClock,
) -> None:
    relay = Relay(engine, celery_app, OutboxSettings(ordering_on_failure="skip"), clock=clock)
    fail_paid(tasks, session, relay, celery_app, consumer)
    relay.maintain()
    [shipped] = published(relay, celery_app)
    assert ["shipped"] == labels([shipped])


def test_a_dead_task_blocks_its_key(
    tasks: TaskOutbox,
    session: Session,
    engine: Engine,
    celery_app: Celery,
    consumer: Consumer,
    clock: FakeClock,
) -> None:
    """A task the relay cannot publish goes dead after max_attempts: its key stops there."""
    relay = Relay(engine, celery_app, OutboxSettings(max_attempts=1), clock=clock)
    kill_paid(tasks, session, relay, celery_app)
    [blocked] = active_keys(session.connection(), blocked_only=True)
    session.rollback()
    assert (OutboxStatus.DEAD, 1) == (blocked.status, blocked.held)
    assert "not registered" in (blocked.blocked_reason or "")
    with engine.begin() as conn:
        unblock(conn, "order:1", UnblockAction.RETRY, clock.now)
    [paid] = published(relay, celery_app)
    consumer.run(paid)
    [shipped] = published(relay, celery_app)
    consumer.run(shipped)
    assert {"order:1": ["paid", "shipped"]} == consumer.applied()


def test_a_task_that_is_not_idempotent_hands_its_key_on_through_lifecycle_tracking(
    tasks: TaskOutbox, session: Session, relay: Relay, celery_app: Celery, consumer: Consumer
) -> None:
    tracker = LifecycleTracker(relay.engine).connect()
    try:
        for label in ("paid", "shipped"):
            tasks.ordered("order:1").delay("ordering.plain", "order:1", label)
            session.commit()
        [paid] = published(relay, celery_app)
        assert [] == published(relay, celery_app)
        consumer.run(paid)
        [shipped] = published(relay, celery_app)
        consumer.run(shipped)
    finally:
        tracker.disconnect()
    assert {"order:1": ["paid", "shipped"]} == consumer.applied()


def test_the_key_keeper_hands_on_a_key_whose_hand_over_was_lost(
    tasks: TaskOutbox, session: Session, relay: Relay, celery_app: Celery, consumer: Consumer
) -> None:
    """A worker that recorded the run's end but died before handing the key on: the
    relays' maintenance finds the finished run and hands the key on."""
    for label in ("paid", "shipped"):
        tasks.ordered("order:1").delay("ordering.plain", "order:1", label)
        session.commit()
    [paid] = published(relay, celery_app)
    consumer.run(paid)  # no tracker: nothing hands the key on
    with relay.engine.begin() as conn:
        conn.execute(
            outbox_table.update()
            .where(outbox_table.c.task_id == uuid.UUID(paid["headers"]["id"]))
            .values(task_state="SUCCESS")
        )
    assert [] == published(relay, celery_app)
    assert 1 == relay.key_keeper.run_once().handed_on
    [shipped] = published(relay, celery_app)
    assert ["shipped"] == labels([shipped])


def test_an_ordered_task_that_cannot_report_its_end_is_refused(
    celery_app: Celery, session: Session, consumer: Consumer
) -> None:
    untracked = TaskOutbox(
        celery_app, default_session=lambda: session, settings=OutboxSettings(track_lifecycle=False)
    )
    with pytest.raises(OrderingNotTrackedError, match=r"ordering\.plain"):
        untracked.ordered("order:1").delay("ordering.plain", "order:1", "paid")
    untracked.ordered("order:1").delay("ordering.apply", "order:1", "paid")  # idempotent: fine


@pytest.mark.parametrize("key", ["", "x" * (MAX_KEY_LENGTH + 1), 42, None])
def test_ordering_keys_must_be_short_strings(tasks: TaskOutbox, key: object) -> None:
    with pytest.raises(InvalidOrderingKeyError):
        tasks.ordered(key)  # type: ignore[arg-type]
    if key is not None:
        with pytest.raises(InvalidOrderingKeyError):
            tasks.apply_async("unit.add", (1, 2), ordering_key=key)  # type: ignore[arg-type]


def test_the_retry_forgets_the_failed_runs_record(
    tasks: TaskOutbox,
    session: Session,
    relay: Relay,
    celery_app: Celery,
    consumer: Consumer,
    clock: FakeClock,
) -> None:
    enqueue(tasks, session, "order:1", "paid")
    [paid] = published(relay, celery_app)
    assert "FAILURE" == consumer.run(paid, FAIL)
    record = select(ProcessedMessage.task_id).where(
        ProcessedMessage.task_id == paid["headers"]["id"]
    )
    with relay.engine.connect() as conn:
        assert conn.execute(record).one_or_none(), "the failure was recorded as consumed"
    with relay.engine.begin() as conn:
        unblock(conn, "order:1", UnblockAction.RETRY, clock.now)
    with relay.engine.connect() as conn:
        assert None is conn.execute(record).one_or_none()


def test_retry_dead_on_a_keys_dead_task_unblocks_the_key(
    tasks: TaskOutbox,
    session: Session,
    engine: Engine,
    celery_app: Celery,
    consumer: Consumer,
    clock: FakeClock,
) -> None:
    relay = Relay(engine, celery_app, OutboxSettings(max_attempts=1), clock=clock)
    kill_paid(tasks, session, relay, celery_app)
    assert 1 == collect_stats(engine, clock.now).blocked_keys
    with engine.begin() as conn:
        assert 1 == retry_dead(conn, clock.now)
    assert 0 == collect_stats(engine, clock.now).blocked_keys, "its task runs again"
    [paid] = published(relay, celery_app)
    consumer.run(paid)
    [shipped] = published(relay, celery_app)
    assert ["shipped"] == labels([shipped])


def skip_dead_paid(
    tasks: TaskOutbox, session: Session, engine: Engine, celery_app: Celery, clock: FakeClock
) -> tuple[Relay, dict[str, object]]:
    """paid goes dead and the key is skipped past it (``on_failure=skip``): shipped is
    published. Returns the relay and shipped's message, not yet run."""
    settings = OutboxSettings(max_attempts=1, ordering_on_failure="skip")
    relay = Relay(engine, celery_app, settings, clock=clock)
    kill_paid(tasks, session, relay, celery_app)
    relay.maintain()
    [shipped] = published(relay, celery_app)
    assert ["shipped"] == labels([shipped])
    return relay, shipped


def test_retry_dead_puts_a_passed_over_task_at_the_end_of_its_key(
    tasks: TaskOutbox,
    session: Session,
    engine: Engine,
    celery_app: Celery,
    consumer: Consumer,
    clock: FakeClock,
) -> None:
    """Revived after its key went past it, paid waits for the task running now."""
    relay, shipped = skip_dead_paid(tasks, session, engine, celery_app, clock)
    with engine.begin() as conn:
        assert 1 == retry_dead(conn, relay.now())
    assert [] == published(relay, celery_app), "not beside shipped, which is running"
    assert "SUCCESS" == consumer.run(shipped)
    [paid] = published(relay, celery_app)
    assert ["paid"] == labels([paid])
    assert ("order:1", 3) == place(paid), "a new place, after every one handed out"


def test_the_cleanup_keeps_a_key_whose_dead_task_is_kept(
    tasks: TaskOutbox,
    session: Session,
    engine: Engine,
    celery_app: Celery,
    consumer: Consumer,
    clock: FakeClock,
) -> None:
    """A key's numbers are never handed out twice: a new task after the cleanup gets the
    next one, not 1 again beside the dead task that holds it."""
    relay, shipped = skip_dead_paid(tasks, session, engine, celery_app, clock)
    assert "SUCCESS" == consumer.run(shipped)
    clock.advance(relay.settings.confirm_timeout)
    relay.maintain()  # shipped's consumer recorded it: confirmed
    # Past the relay's clock and the consumer's (which hands keys on at the real time).
    later = max(relay.now(), datetime.now(UTC)) + timedelta(days=1)
    assert 1 == purge_outbox(engine, later)  # shipped; the dead paid is kept
    assert 0 == purge_idle_keys(engine, later)
    enqueue(tasks, session, "order:1", "delivered")
    [delivered] = published(relay, celery_app)
    assert ("order:1", 3) == place(delivered)
    assert 0 == collect_stats(engine, relay.now()).blocked_keys
