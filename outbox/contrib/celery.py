"""The beat-scheduled sweep: a Celery task that drains due outbox rows.

The sweep runs on its own queue (``outbox`` by default) so that it does not queue behind
a backlog of business tasks: if it did, every task enqueued through the outbox would be
delayed by that backlog too. Declare that queue beside the default one
(``task_queues = task_queues()``), and a plain ``celery -A app worker`` consumes both. A
pool busy with long tasks still has no slot for it, so production setups give the queue
a small worker of its own (``-Q outbox -c 1``) or run the relay process as well. A
worker started without the queue says so in its log.

Sweeps never pile up: each one expires after one interval, so sweeps queued while no
worker was running are discarded instead of all running at once on restart. Overlapping
sweeps are safe because the relay claims rows with ``SKIP LOCKED``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from celery import Celery, Task
from celery.signals import celeryd_after_setup
from kombu import Queue

from outbox.maintenance.heartbeat import forget_relays
from outbox.maintenance.retention import purge_idle_keys, purge_outbox, purge_processed
from outbox.relays.batch import Relay
from outbox.settings import OutboxSettings

logger = logging.getLogger(__name__)

SWEEP_TASK_NAME = "outbox.sweep"
CLEANUP_TASK_NAME = "outbox.cleanup"
SWEEP_QUEUE = "outbox"
#: The cleanup runs hourly: each run deletes what aged out since the last one.
CLEANUP_INTERVAL = 3600.0
#: Relays not seen for this long (seconds) are dropped from the status: hosts that left.
FORGET_RELAYS_AFTER = 86400.0


def task_queues(default_queue: str = "celery", *others: str) -> tuple[Queue, ...]:
    """``task_queues`` for a Celery app that runs the sweep: its default queue and the
    sweep's, plus ``others``. A worker started without ``-Q`` consumes all of them."""
    names = dict.fromkeys([default_queue, SWEEP_QUEUE, *others])
    return tuple(Queue(name) for name in names)


def register_sweep_task(
    celery_app: Celery, relay: Callable[[], Relay], *, name: str = SWEEP_TASK_NAME
) -> Task[[], dict[str, Any]]:
    """Register the sweep task on ``celery_app``; ``relay`` returns the relay to drain with.

    ``relay`` is called inside the worker at run time, not at import, so it can build the
    relay from an application that only exists in the worker process.
    """

    @celeryd_after_setup.connect(weak=False)
    def _warn_if_not_consumed(instance: Any = None, **_: Any) -> None:
        app = getattr(instance, "app", None)
        if app is not celery_app:
            return
        consumed = set(app.amqp.queues.consume_from or app.amqp.queues)
        scheduled = [
            (entry.get("options") or {}).get("queue", SWEEP_QUEUE)
            for entry in (app.conf.beat_schedule or {}).values()
            if entry.get("task") == name
        ]
        for queue in dict.fromkeys(scheduled):
            if queue in consumed:
                continue
            logger.warning(
                "this worker does not consume the %r queue, where the outbox sweep runs: "
                "unless another worker does (or `flask outbox relay` runs), nothing "
                "enqueued through the outbox is published. This worker consumes: %s",
                queue,
                ", ".join(sorted(consumed)),
            )

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
    """Register the retention cleanup: dispatched rows and idle ordering keys past
    ``settings.retention`` and processed ids past ``settings.processed_retention`` are
    deleted in bounded batches, and relays not seen for a day are dropped from the status.

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
            "ordering_keys_forgotten": purge_idle_keys(
                current.engine, now - timedelta(seconds=settings.retention)
            ),
            "relays_forgotten": forget_relays(
                current.engine, now - timedelta(seconds=FORGET_RELAYS_AFTER)
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
