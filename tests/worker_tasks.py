"""Tasks only the tests' worker imports (``celery -A tasks worker -I tests.worker_tasks``).

Each is written as the README recommends a real task be written (idempotent, acknowledged
late) and makes Celery run it again in one of the ways real tasks do, so the tests can
check that the outbox does not take the first run for the last.
"""

from __future__ import annotations

from typing import Any

from celery.exceptions import Reject

from tasks.application import app
from webapp import fulfilment
from webapp.extensions import outbox

RELIABLE = {"bind": True, "acks_late": True, "reject_on_worker_lost": True}


def first_time(task_id: str, what: str) -> bool:
    """Whether this is the first time ``what`` happens to this task (a counter in Redis,
    outside the task's transaction, so a rolled-back run still counts)."""
    with app.connection_for_write() as conn:
        return int(conn.default_channel.client.incr(f"tests:{what}:{task_id}")) == 1


@app.task(name="tests.reject_once", **RELIABLE)
@outbox.idempotent
def reject_once(self: Any, order_id: int) -> None:
    """Hands its first delivery back to the broker (``Reject(requeue=True)``)."""
    if first_time(self.request.id, "reject"):
        raise Reject("not yet", requeue=True)
    fulfilment.reserve_stock(order_id, task_id=self.request.id)


@app.task(name="tests.retry_once_later", **RELIABLE)
@outbox.idempotent
def retry_once_later(self: Any, order_id: int, countdown: float) -> None:
    """Asks to be retried after ``countdown`` seconds on its first run."""
    if self.request.retries == 0:
        raise self.retry(countdown=countdown)
    fulfilment.reserve_stock(order_id, task_id=self.request.id)


@app.task(name="tests.notify_plainly", bind=True, acks_late=True)
def notify_plainly(self: Any, order_id: int, event: str) -> None:
    """Not an idempotent consumer: its key is handed on by the worker's lifecycle tracking.
    Commits its notice on its own, as a task written without the outbox's help does."""
    from webapp.extensions import db

    fulfilment.notify_customer(order_id, task_id=self.request.id, event=event)
    db.session.commit()


@app.task(name="tests.hold_key_plainly", bind=True)
def hold_key_plainly(self: Any, order_id: int, event: str) -> None:
    """A plain ordered task (acknowledged on receipt) whose first run holds its key until
    its worker process is killed; later runs notify at once."""
    from webapp.extensions import db

    if first_time(self.request.id, "hold"):
        with app.connection_for_write() as conn:
            conn.default_channel.client.blpop(f"tests:release:{self.request.id}", timeout=60)
    fulfilment.notify_customer(order_id, task_id=self.request.id, event=event)
    db.session.commit()
