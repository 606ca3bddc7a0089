"""The example's Celery app with the benchmark's own task: ``celery -A bench.celery_app``.

``bench.count`` stands for the cheapest real task there is, so the end-to-end figures
measure the outbox, the broker and Celery rather than task code: it counts itself done
in Redis (one round trip), runs outside a Flask app context (a plain ``celery.Task``,
not the example's ``AppContextTask``) and stores no result. Workers load this module,
and so does every process that relays rows of this task, since the relay only publishes
tasks registered with its app.
"""

from __future__ import annotations

import functools
import time
from typing import Any, cast

import redis
from celery import Celery, Task

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


__all__ = ["COUNT_TASK", "EXPECTED_KEY", "FINISHED_AT_KEY", "FINISHED_KEY", "app", "count"]
