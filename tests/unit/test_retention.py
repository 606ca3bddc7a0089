"""Retention: old rows are deleted in bounded batches; nothing pending or unconfirmed is."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from celery import Celery
from flask import Flask
from sqlalchemy import Engine, insert, select

from outbox import (
    InvalidSettingError,
    OutboxSettings,
    OutboxStatus,
    ProcessedMessage,
    Relay,
    RelayKind,
    outbox_table,
)
from outbox.contrib.celery import register_cleanup_task
from outbox.data.schema import keys_table
from outbox.maintenance.heartbeat import Heartbeat, relays_seen
from outbox.maintenance.retention import purge_outbox, purge_processed
from outbox.settings import parse_duration
from tests.unit.conftest import FakeClock, count_rows
from webapp.extensions import db

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
DAY = timedelta(days=1)


def add_row(
    engine: Engine,
    status: OutboxStatus,
    age: timedelta,
    *,
    awaiting_confirmation: bool = False,
) -> None:
    moment = NOW - age
    with engine.begin() as conn:
        conn.execute(
            insert(outbox_table).values(
                task_id=uuid.uuid4(),
                task_name="unit.add",
                args=[1, 2],
                kwargs={},
                options={},
                status=status,
                attempts=1,
                created_at=moment,
                available_at=moment,
                dispatched_at=moment if status == OutboxStatus.DISPATCHED else None,
                confirm_deadline=NOW + DAY if awaiting_confirmation else None,
            )
        )


def test_old_dispatched_rows_go_in_batches_and_the_rest_stay(engine: Engine) -> None:
    """Only dispatched rows past the cut-off go, a batch per transaction."""
    for _ in range(10):
        add_row(engine, OutboxStatus.DISPATCHED, 8 * DAY)
    add_row(engine, OutboxStatus.DISPATCHED, 6 * DAY)
    add_row(engine, OutboxStatus.DISPATCHED, 8 * DAY, awaiting_confirmation=True)
    add_row(engine, OutboxStatus.PENDING, 30 * DAY)
    add_row(engine, OutboxStatus.DEAD, 30 * DAY)
    batches: list[int] = []
    deleted = purge_outbox(engine, NOW - 7 * DAY, batch_size=3, progress=batches.append)
    assert 10 == deleted
    assert [3, 3, 3, 1] == batches
    assert 2 == count_rows(engine, status=OutboxStatus.DISPATCHED), "young and unconfirmed"
    assert 1 == count_rows(engine, status=OutboxStatus.PENDING)
    assert 1 == count_rows(engine, status=OutboxStatus.DEAD)


def test_dead_rows_go_only_when_asked(engine: Engine) -> None:
    """Dead rows are evidence: purged only when named, and by their creation time."""
    add_row(engine, OutboxStatus.DEAD, 8 * DAY)
    add_row(engine, OutboxStatus.DEAD, 1 * DAY)
    assert 1 == purge_outbox(engine, NOW - 7 * DAY, statuses=[OutboxStatus.DEAD])
    assert 1 == count_rows(engine, status=OutboxStatus.DEAD)


def test_processed_ids_are_forgotten_after_their_retention(engine: Engine) -> None:
    """Processed task ids older than the cut-off are deleted, newer ones kept."""
    with engine.begin() as conn:
        for task_id, age in [("old", 40 * DAY), ("new", DAY)]:
            conn.execute(
                insert(ProcessedMessage).values(
                    task_id=task_id, task_name="unit.add", processed_at=NOW - age
                )
            )
    assert 1 == purge_processed(engine, NOW - 30 * DAY)
    with engine.connect() as conn:
        assert ["new"] == list(conn.scalars(select(ProcessedMessage.task_id)))


def test_cleanup_task_applies_both_retentions(
    engine: Engine, celery_app: Celery, clock: FakeClock
) -> None:
    """The beat-scheduled cleanup uses the relay's settings and clock, and forgets relays
    not seen for a day."""
    clock.now = NOW
    add_row(engine, OutboxStatus.DISPATCHED, 2 * DAY)
    add_row(engine, OutboxStatus.DISPATCHED, DAY / 2)
    settings = OutboxSettings(retention=DAY.total_seconds())
    relay = Relay(engine, celery_app, settings, clock=clock)
    Heartbeat(engine, relay.store, RelayKind.SWEEP, hostname="gone").beat(NOW - 2 * DAY)
    Heartbeat(engine, relay.store, RelayKind.SWEEP, hostname="here").beat(NOW - DAY / 2)
    with engine.begin() as conn:
        for key, seq, head, age in [("idle-old", 3, None, 2 * DAY), ("busy-old", 3, 3, 2 * DAY)]:
            conn.execute(
                insert(keys_table).values(
                    key=key, last_seq=seq, head_seq=head, updated_at=NOW - age
                )
            )
        conn.execute(
            insert(keys_table).values(key="idle-new", last_seq=1, updated_at=NOW - DAY / 2)
        )
    cleanup = register_cleanup_task(celery_app, relay=lambda: relay)
    assert {
        "outbox_rows": 1,
        "processed_rows": 0,
        "ordering_keys_forgotten": 1,
        "relays_forgotten": 1,
    } == cleanup.run()
    with engine.connect() as conn:
        kept = set(conn.scalars(select(keys_table.c.key)))
    assert {"busy-old", "idle-new"} == kept, "a key with a task waiting is never forgotten"
    with engine.connect() as conn:
        assert ["sweep@here"] == [seen.name for seen in relays_seen(conn, NOW)]


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("7d", 604800), ("12h", 43200), ("30m", 1800), ("45s", 45), ("2w", 1209600), ("90", 90)],
)
def test_durations_read_like_people_write_them(text: str, seconds: float) -> None:
    """7d, 12h, 30m, 45s, 2w and plain seconds are understood."""
    assert timedelta(seconds=seconds) == parse_duration(text)


def test_a_bad_duration_says_how_to_write_one() -> None:
    """A duration without a known unit is refused with examples."""
    with pytest.raises(InvalidSettingError, match=r"e\.g\. 7d, 12h"):
        parse_duration("a week")


def test_retention_settings_accept_durations_and_check_their_order() -> None:
    """OUTBOX_RETENTION=7d works; processed ids must outlive the confirmation timeout."""
    settings = OutboxSettings.from_mapping({"OUTBOX_RETENTION": "2d"})
    assert 2 * 86400 == settings.retention
    with pytest.raises(InvalidSettingError, match="longer than confirm_timeout"):
        OutboxSettings.from_mapping(
            {"OUTBOX_CONFIRM_TIMEOUT": "7200", "OUTBOX_PROCESSED_RETENTION": "1h"}
        )


def test_purge_command_deletes_and_reports(app_context: Flask) -> None:
    """`flask outbox purge --older-than 7d` deletes old dispatched rows and says how many."""
    real_now = datetime.now(UTC)
    with db.engine.begin() as conn:
        for age in (8 * DAY, DAY):
            conn.execute(
                insert(outbox_table).values(
                    task_id=uuid.uuid4(),
                    task_name="orders.notify_customer",
                    args=[1],
                    kwargs={},
                    options={},
                    status=OutboxStatus.DISPATCHED,
                    attempts=1,
                    created_at=real_now - age,
                    available_at=real_now - age,
                    dispatched_at=real_now - age,
                )
            )
    result = app_context.test_cli_runner().invoke(
        args=["outbox", "purge", "--older-than", "7d", "--processed"]
    )
    assert 0 == result.exit_code, result.output
    assert "deleted 1 outbox row(s), forgot 0 processed task id(s)" in result.output
    assert 1 == count_rows(db.engine)


def test_purge_command_rejects_a_bad_age(app_context: Flask) -> None:
    """A malformed --older-than is a usage error naming the option."""
    result = app_context.test_cli_runner().invoke(args=["outbox", "purge", "--older-than", "soon"])
    assert 2 == result.exit_code
    assert "--older-than" in result.output


def test_purge_refuses_to_forget_processed_ids_inside_the_confirm_timeout(
    app_context: Flask,
) -> None:
    """Forgetting ids younger than OUTBOX_CONFIRM_TIMEOUT would let redeliveries apply again."""
    result = app_context.test_cli_runner().invoke(
        args=["outbox", "purge", "--older-than", "30m", "--processed"]
    )
    assert 2 == result.exit_code
    assert "OUTBOX_CONFIRM_TIMEOUT" in result.output
