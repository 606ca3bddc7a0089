"""Helpers for *your* tests: see what a block of code enqueued, without a broker.

    with capture_tasks(outbox.tasks) as captured:
        client.post(f"/orders/{order_id}/confirm")
    assert ["orders.notify_customer", ...] == captured.task_names
    captured.run()  # optionally run them, eagerly, in this process

Like Django's ``captureOnCommitCallbacks``, it records the enqueue calls made inside the
block, whether or not their transaction later committed: assert on what the code asked
for, and test commit and rollback behaviour against the database.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from celery.result import EagerResult

from outbox.enqueue.serialization import from_wire
from outbox.enqueue.task_outbox import EnqueuedTask, TaskOutbox

__all__ = ["CapturedTasks", "EnqueuedTask", "capture_tasks"]


class CapturedTasks(list[EnqueuedTask]):
    """The tasks enqueued inside a :func:`capture_tasks` block, in call order."""

    def __init__(self, outbox: TaskOutbox) -> None:
        super().__init__()
        self._outbox = outbox

    @property
    def task_names(self) -> list[str]:
        return [task.task_name for task in self]

    def named(self, task_name: str) -> list[EnqueuedTask]:
        return [task for task in self if task.task_name == task_name]

    def run(self) -> list[EagerResult[Any]]:
        """Run every captured task in this process, under its task id, as a worker would.

        Arguments go through the same JSON round trip as a real publish, so a task that
        would choke on its deserialized arguments fails here too.
        """
        results: list[EagerResult[Any]] = []
        for enqueued in self:
            task = self._outbox.celery_app.tasks[enqueued.task_name]
            results.append(
                task.apply(
                    args=from_wire(enqueued.args),
                    kwargs=from_wire(enqueued.kwargs),
                    task_id=enqueued.task_id,
                    throw=True,
                )
            )
        return results


@contextmanager
def capture_tasks(outbox: TaskOutbox) -> Iterator[CapturedTasks]:
    """Record every task ``outbox`` enqueues inside the block.

    For the Flask extension pass ``outbox.tasks`` (inside an application context).
    """
    captured = CapturedTasks(outbox)
    outbox.observers.append(captured.append)
    try:
        yield captured
    finally:
        outbox.observers.remove(captured.append)
