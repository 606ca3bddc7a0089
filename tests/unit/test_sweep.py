"""The Celery sweep task and its beat schedule entry."""

from __future__ import annotations

from celery import Celery
from sqlalchemy.orm import Session

from outbox import OutboxSettings, Relay, TaskOutbox
from outbox.contrib.celery import SWEEP_TASK_NAME, periodic_tasks, register_sweep_task
from tests.unit.conftest import drain_queue


def test_sweep_drains_the_outbox(
    celery_app: Celery, relay: Relay, tasks: TaskOutbox, session: Session
) -> None:
    """Running the sweep task publishes every due row."""
    sweep = register_sweep_task(celery_app, relay=lambda: relay)
    for i in range(15):
        tasks.delay("unit.add", i, i)
    session.commit()
    summary = sweep.run()
    assert 15 == summary["published"]
    assert 15 == len(drain_queue(celery_app))


def test_sweep_is_registered_under_its_name(celery_app: Celery, relay: Relay) -> None:
    """Beat schedules the sweep by name, so the name is part of the contract."""
    register_sweep_task(celery_app, relay=lambda: relay)
    assert SWEEP_TASK_NAME in celery_app.tasks


def test_schedule_runs_every_interval_on_its_queue_and_expires() -> None:
    """Sweeps run on the outbox queue and expire after one interval, so they never pile up."""
    schedule = periodic_tasks(OutboxSettings(sweep_interval=2.5))
    entry = schedule["outbox-sweep"]
    assert SWEEP_TASK_NAME == entry["task"]
    assert 2.5 == entry["schedule"]
    assert {"queue": "outbox", "expires": 2.5} == entry["options"]
    cleanup = schedule["outbox-cleanup"]
    assert ("outbox.cleanup", 3600.0) == (cleanup["task"], cleanup["schedule"])


def test_example_celeryconfig_schedules_the_sweep_and_speaks_json_only() -> None:
    """The shipped celeryconfig wires the sweep into beat and accepts only JSON."""
    import celeryconfig

    assert SWEEP_TASK_NAME == celeryconfig.beat_schedule["outbox-sweep"]["task"]
    assert ["json"] == celeryconfig.accept_content
    assert "json" == celeryconfig.task_serializer
    assert {"queue": "outbox"} == celeryconfig.task_routes[SWEEP_TASK_NAME]
