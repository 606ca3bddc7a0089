"""The example's Celery app with the benchmark's own task: ``celery -A bench.celery_app``.

``bench.count`` stands for the cheapest real task there is, so the end-to-end figures
measure the outbox, the broker and Celery rather than task code: it counts itself done
in Redis (one round trip), runs outside a Flask app context (a plain ``celery.Task``,
not the example's ``AppContextTask``) and stores no result. Workers load this module,
and so does every process that relays rows of this task, since the relay only publishes
tasks registered with its app. A run says how many tasks it expects
(:func:`expect_finished`) and waits for the last one (:func:`last_finished`).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, cast

import redis
from celery import Celery, Task
from celery.result import (  # type: ignore[attr-defined]
    _set_task_join_will_block,
    task_join_will_block,
)

from tasks import app as _example_app

#: The example's app (``tasks.app``), typed as the plain ``Celery`` the outbox takes.
app = cast(Celery, _example_app)

COUNT_TASK = "bench.count"
#: Keys in the broker's Redis DB (the run's own): tasks finished so far, how many the
#: run expects, and when the task that reached that number finished.
FINISHED_KEY = "bench:finished"
EXPECTED_KEY = "bench:expected"
FINISHED_AT_KEY = "bench:finished-at"

# One round trip: count this task, and if it is the last one the run expects, record the
# moment (CLOCK_MONOTONIC, which every process on the machine shares).
_COUNT = """
local finished = redis.call('INCR', KEYS[1])
if finished == tonumber(redis.call('GET', KEYS[2])) then
    redis.call('SET', KEYS[3], ARGV[1])
end
return finished
"""


@functools.cache
def _count_script() -> Any:
    """One client and registered script per worker process, on the broker's Redis DB."""
    return redis.Redis.from_url(app.conf.broker_url).register_script(_COUNT)


@app.task(name=COUNT_TASK, base=Task, ignore_result=True)
def count(number: int) -> None:
    _count_script()(
        keys=[FINISHED_KEY, EXPECTED_KEY, FINISHED_AT_KEY],
        args=[repr(time.clock_gettime(time.CLOCK_MONOTONIC))],
    )


def expect_finished(client: redis.Redis, rows: int) -> None:
    """Start counting afresh: the run expects ``rows`` tasks of ``bench.count``."""
    client.delete(FINISHED_KEY, FINISHED_AT_KEY)
    client.set(EXPECTED_KEY, rows)


def last_finished(
    client: redis.Redis, rows: int, timeout: float, stalled: Callable[[], str] | None = None
) -> float:
    """When (``CLOCK_MONOTONIC``) the last of the ``rows`` tasks expected finished; fails
    after ``timeout`` seconds, saying how many did (and what ``stalled`` says of the run)."""
    deadline = time.monotonic() + timeout
    while (finished_at := client.get(FINISHED_AT_KEY)) is None:
        if time.monotonic() > deadline:
            done = int(client.get(FINISHED_KEY) or 0)
            where = f" ({stalled()})" if stalled is not None else ""
            raise RuntimeError(f"only {done} of {rows} tasks finished in time{where}")
        time.sleep(0.01)
    return float(finished_at)


@contextmanager
def result_subscriptions(subscribe: bool) -> Iterator[None]:
    """Publish with Celery subscribing to each task's result channel (as it does in a
    process that may wait for results, with the Redis result backend) or not (as in a
    worker and the relay command), for the block."""
    joined = task_join_will_block()
    _set_task_join_will_block(not subscribe)
    try:
        yield
    finally:
        _set_task_join_will_block(joined)


__all__ = [
    "COUNT_TASK",
    "EXPECTED_KEY",
    "FINISHED_AT_KEY",
    "FINISHED_KEY",
    "app",
    "count",
    "expect_finished",
    "last_finished",
    "result_subscriptions",
]
