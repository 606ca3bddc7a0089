"""The beat-scheduled sweep: a Celery task that drains due outbox rows.

The sweep runs on its own queue (``outbox`` by default) so that it does not queue behind
a backlog of business tasks: if it did, every task enqueued through the outbox would be
delayed by that backlog too. Workers must consume that queue (``-Q celery,outbox``). A
pool busy with long tasks still has no slot for it, so production setups give the queue
a small worker of its own (``-Q outbox -c 1``) or run the relay process as well.

Sweeps never pile up: each one expires after one interval, so sweeps queued while no
worker was running are discarded instead of all running at once on restart. Overlapping
sweeps are safe because the relay claims rows with ``SKIP LOCKED``.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

from celery import Celery, Task

from outbox.relay import Relay
from outbox.retention import purge_outbox, purge_processed
from outbox.settings import OutboxSettings

SWEEP_TASK_NAME = "outbox.sweep"
CLEANUP_TASK_NAME = "outbox.cleanup"
SWEEP_QUEUE = "outbox"
#: The cleanup runs hourly: each run deletes what aged out since the last one.
CLEANUP_INTERVAL = 3600.0


def register_sweep_task(
    celery_app: Celery, relay: Callable[[], Relay], *, name: str = SWEEP_TASK_NAME
) -> Task[[], dict[str, Any]]:
    """Register the sweep task on ``celery_app``; ``relay`` returns the relay to drain with.

    ``relay`` is called inside the worker at run time, not at import, so it can build the
    relay from an application that only exists in the worker process.
    """

    @celery_app.task(name=name, ignore_result=True, shared=False)
    def sweep() -> dict[str, Any]:
        result = relay().drain()
        return {
            "batches": result.batches,
            "published": result.published,
            "failed": result.failed,
            "dead": result.dead,
            "broker_unavailable": result.broker_unavailable,
            "redelivered": result.redelivered,
        }

    return sweep


def register_cleanup_task(
    celery_app: Celery, relay: Callable[[], Relay], *, name: str = CLEANUP_TASK_NAME
) -> Task[[], dict[str, int]]:
    """Register the retention cleanup: dispatched rows past ``settings.retention`` and
    processed ids past ``settings.processed_retention`` are deleted in bounded batches.

    It takes the relay for its engine, settings and clock, so it needs no wiring of its own.
    """

    @celery_app.task(name=name, ignore_result=True, shared=False)
    def cleanup() -> dict[str, int]:
        current = relay()
        now = current.now()
        settings = current.settings
        return {
            "outbox_rows": purge_outbox(
                current.engine, now - timedelta(seconds=settings.retention)
            ),
            "processed_rows": purge_processed(
                current.engine, now - timedelta(seconds=settings.processed_retention)
            ),
        }

    return cleanup


def periodic_tasks(
    settings: OutboxSettings | None = None,
    *,
    name: str = SWEEP_TASK_NAME,
    queue: str = SWEEP_QUEUE,
) -> dict[str, dict[str, Any]]:
    """``beat_schedule`` entries: the sweep every ``settings.sweep_interval``, the
    retention cleanup hourly. Register both tasks (``register_sweep_task``,
    ``register_cleanup_task``)."""
    interval = (settings or OutboxSettings()).sweep_interval
    return {
        "outbox-sweep": {
            "task": name,
            "schedule": interval,
            "options": {"queue": queue, "expires": interval},
        },
        "outbox-cleanup": {
            "task": CLEANUP_TASK_NAME,
            "schedule": CLEANUP_INTERVAL,
            "options": {"queue": queue, "expires": CLEANUP_INTERVAL},
        },
    }
