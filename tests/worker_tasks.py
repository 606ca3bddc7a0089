"""Tasks only the tests' worker imports (``celery -A tasks worker -I tests.worker_tasks``).

Each is written as the README recommends a real task be written (idempotent, acknowledged
late) and makes Celery run it again in one of the ways real tasks do, so the tests can
check that the outbox does not take the first run for the last.
"""

from __future__ import annotations

import time
import warnings
from typing import Any

from celery.exceptions import CDeprecationWarning, Reject

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


#: The queue the routed tasks below go to: only a worker started for it consumes it
#: (``celery -A tasks worker --queues chaos-routed -I tests.worker_tasks``).
ROUTED_QUEUE = "chaos-routed"
#: Routed by the ``queue`` task attribute, as many users' tasks still are; Celery 5.5+
#: warns that it goes in 6.0 (``task_routes`` instead). The tasks are created here at
#: once (``lazy=False``), on this app only (``shared=False``, not again on every app
#: finalized later), so the warning is raised here, and let pass here only.
ROUTED = {"queue": ROUTED_QUEUE, "lazy": False, "shared": False}

with warnings.catch_warnings():
    warnings.filterwarnings(
        "ignore", r"\s*The 'queue' task attribute is deprecated", CDeprecationWarning
    )

    @app.task(name="tests.reserve_routed", **ROUTED, **RELIABLE)
    @outbox.idempotent
    def reserve_routed(self: Any, order_id: int) -> None:
        """Reserves stock from the routed queue."""
        fulfilment.reserve_stock(order_id, task_id=self.request.id)

    @app.task(name="tests.notify_routed", **ROUTED, **RELIABLE)
    @outbox.idempotent
    def notify_routed(self: Any, order_id: int, event: str) -> None:
        """Sends the notice: the replacement of ``notify_by_replacement``."""
        fulfilment.notify_customer(order_id, task_id=self.request.id, event=event)

    @app.task(name="tests.notify_by_replacement", **ROUTED, **RELIABLE)
    @outbox.idempotent
    def notify_by_replacement(self: Any, order_id: int, event: str) -> None:
        """Replaces itself with ``notify_routed``, which applies the effect under this
        task's id (and, for an ordered task, hands its key on)."""
        raise self.replace(notify_routed.si(order_id, event))

    @app.task(name="tests.notify_on_receipt", bind=True, **ROUTED)
    def notify_on_receipt(self: Any, order_id: int, event: str, seconds: float) -> None:
        """Not an idempotent consumer, and acknowledged on receipt (Celery's default): a
        send that takes ``seconds``, half before its notice commits and half after (the
        provider's receipt), so a worker killed while it runs leaves its key at a task
        that did, or did not, apply its effect, and whose message is gone."""
        from webapp.extensions import db

        time.sleep(seconds / 2)
        fulfilment.notify_customer(order_id, task_id=self.request.id, event=event)
        db.session.commit()
        time.sleep(seconds / 2)
