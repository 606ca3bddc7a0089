"""End to end: from committed rows to finished tasks, with one and with two workers.

One relay process publishes the rows of ``bench.count`` (see :mod:`bench.celery_app`)
while real ``celery worker`` processes run them; the run ends when the last task has
counted itself done. Workers are ``-P solo`` (:func:`bench.children.celery_workers`).
Both workers start once and stay up: worker A consumes queues one and two, worker B
only queue two, so a run's rows go to queue one for one worker and to queue two for two.

The relay's own publish rate during the run is reported beside the end-to-end rate: if
they are close, the relay is the bottleneck; if the end-to-end rate is much lower, the
workers are.
"""

from __future__ import annotations

import os

from celery import Celery

from bench.celery_app import COUNT_TASK, expect_finished, last_finished
from bench.children import celery_workers
from bench.context import Context, rotated
from bench.drains import relays
from bench.results import Figure
from outbox import OutboxSettings

SECTION = "e2e"
QUEUE_ONE, QUEUE_TWO = "bench.e2e.1", "bench.e2e.2"
WARMUP_ROWS = 50


def run(ctx: Context) -> list[Figure]:
    pid = os.getpid()
    node_a, node_b = f"bench-a-{pid}@localhost", f"bench-b-{pid}@localhost"
    queues = {1: QUEUE_ONE, 2: QUEUE_TWO}
    end_to_end: dict[int, list[float]] = {1: [], 2: []}
    publish: dict[int, list[float]] = {1: [], 2: []}
    workers = celery_workers(
        ctx.services.work_dir,
        ctx.celery_app,
        [("worker-a", node_a, f"{QUEUE_ONE},{QUEUE_TWO}"), ("worker-b", node_b, QUEUE_TWO)],
    )
    try:
        for queue in queues.values():
            _once(ctx, queue, WARMUP_ROWS)
        rows = ctx.sizes.e2e_rows
        for run_index in range(ctx.repeats):
            for count in rotated([1, 2], run_index):
                ctx.say(f"e2e: run {run_index + 1}/{ctx.repeats}, {count} worker(s), {rows:,}")
                total, relay_rate = _once(ctx, queues[count], rows)
                end_to_end[count].append(total)
                publish[count].append(relay_rate)
    finally:
        for worker in workers:
            worker.stop()
    setup = _worker_setup(ctx.celery_app)
    rows_note = f"{ctx.sizes.e2e_rows:,} rows of bench.count, one relay; {setup}"
    return [
        Figure(
            SECTION,
            "commit → finished, 1 worker (-P solo)",
            "tasks/s",
            end_to_end[1],
            note=rows_note,
        ),
        Figure(
            SECTION,
            "commit → finished, 2 workers (-P solo)",
            "tasks/s",
            end_to_end[2],
        ),
        Figure(
            SECTION,
            "  relay's publish rate in the 1-worker runs",
            "tasks/s",
            publish[1],
            note="the relay shares the 2 cores with the workers",
        ),
        Figure(SECTION, "  relay's publish rate in the 2-worker runs", "tasks/s", publish[2]),
    ]


def _once(ctx: Context, queue: str, rows: int) -> tuple[float, float]:
    """One run; returns the end-to-end rate and the relay's publish rate (tasks/s)."""
    expect_finished(ctx.redis, rows)
    timed = relays(
        ctx, rows, task_name=COUNT_TASK, options={"queue": queue}, queue=queue, consumed=True
    )
    finished_at = last_finished(ctx.redis, rows, 120 + rows / 100)
    start = min(report["start"] for report in timed.children)
    return rows / (finished_at - start), timed.rate


def _worker_setup(celery_app: Celery) -> str:
    """What the workers do per task besides the task, as the example configures them."""
    from webapp import config

    settings = OutboxSettings.from_mapping(config.outbox_settings())
    tracking = getattr(settings, "track_lifecycle", None)
    events = "on" if celery_app.conf.worker_send_task_events else "off"
    parts = [f"task events {events}"]
    if tracking is not None:
        parts.append(f"lifecycle tracking {'on' if tracking else 'off'}")
    return ", ".join(parts)
