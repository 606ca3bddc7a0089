"""Commit → publish latency at a steady offered load, with a publisher already running.

This process enqueues at a fixed rate, each task in its own committed transaction through
:class:`outbox.TaskOutbox` and an ORM session (the application's code path), and notes
the time right after COMMIT returns. A watcher process pops the raw messages off the
Redis queue as they land and notes when each task id arrived. Latency is arrival minus
commit, on the machine-wide monotonic clock. A few tasks go through first, and are
waited for: the publisher's first publish connects to Redis and declares the queue,
which is start-up, not latency.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from bench.children import monotonic, wait_for, watching
from bench.context import Context
from bench.data import empty_queue, queue_length
from outbox import TaskOutbox

#: Tasks sent through before measuring.
WARMUP_TASKS = 5


@dataclass(frozen=True, slots=True)
class Paced:
    """What one run measured."""

    #: Commit → arrival of every task, ms.
    latencies: list[float]
    #: Enqueues per second achieved.
    rate: float


def commit_to_publish(
    ctx: Context,
    engine: Engine,
    what: str,
    *,
    watch_seconds: float,
    warm_up_seconds: float,
    before_go: Callable[[], None] = lambda: None,
) -> Paced:
    """``latency_rate`` enqueues a second for ``latency_seconds`` into ``engine``'s outbox,
    once the warm-up's tasks were published and ``before_go`` ran; the watcher gives up
    after ``watch_seconds``."""
    from tasks.orders import notify_customer

    count = round(ctx.sizes.latency_rate * ctx.sizes.latency_seconds)
    outbox = TaskOutbox(ctx.celery_app)
    with watching(ctx.services.work_dir, count, watch_seconds) as watcher:
        _warm_up(ctx, engine, outbox, notify_customer, warm_up_seconds)
        before_go()
        watcher.go()
        start = monotonic()
        commits = _paced_enqueues(engine, outbox, notify_customer, count, ctx.sizes.latency_rate)
        achieved = count / (monotonic() - start)
        arrivals = watcher.arrivals()
    missing = set(commits) - set(arrivals)
    if missing:
        raise RuntimeError(f"{what}: {len(missing)} of {count} tasks never reached the queue")
    latencies = [(arrivals[task_id] - committed) * 1000 for task_id, committed in commits.items()]
    return Paced(latencies, achieved)


def _paced_enqueues(
    engine: Engine, outbox: TaskOutbox, task: Any, count: int, rate: float
) -> dict[str, float]:
    """``count`` enqueues of ``task`` at ``rate`` a second, each committed alone: when
    each task id committed (``monotonic``)."""
    commits: dict[str, float] = {}
    start = monotonic() + 0.05
    for number in range(count):
        pause = start + number / rate - monotonic()
        if pause > 0:
            time.sleep(pause)
        with Session(engine) as session:
            task_id = outbox.apply_async(task, args=(number,), session=session).id
            session.commit()
            commits[task_id] = monotonic()
    return commits


def _warm_up(ctx: Context, engine: Engine, outbox: TaskOutbox, task: Any, timeout: float) -> None:
    for number in range(WARMUP_TASKS):
        with Session(engine) as session:
            outbox.apply_async(task, args=(number,), session=session)
            session.commit()
    wait_for(
        lambda: queue_length(ctx.redis) >= WARMUP_TASKS,
        timeout,
        "the warm-up tasks published",
        interval=0.01,
    )
    empty_queue(ctx.redis)
