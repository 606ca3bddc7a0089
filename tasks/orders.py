"""Order fulfilment tasks: thin wrappers that call plain functions in ``webapp.fulfilment``.

Each is idempotent per task id (its effect and the processed marker commit together) and
acknowledged late, so a worker killed mid-task leaves the message to be redelivered and
the redelivery applies the effect exactly once.
"""

from __future__ import annotations

from typing import Any

from tasks.application import app
from webapp import fulfilment
from webapp.extensions import outbox

RELIABLE = {"bind": True, "acks_late": True, "reject_on_worker_lost": True}


@app.task(name="orders.notify_customer", **RELIABLE)
@outbox.idempotent
def notify_customer(self: Any, order_id: int, event: str = "confirmed") -> None:
    fulfilment.notify_customer(order_id, task_id=self.request.id, event=event)


@app.task(name="orders.reserve_stock", **RELIABLE)
@outbox.idempotent
def reserve_stock(self: Any, order_id: int) -> None:
    fulfilment.reserve_stock(order_id, task_id=self.request.id)


@app.task(name="orders.prepare_shipment", **RELIABLE)
@outbox.idempotent
def prepare_shipment(self: Any, order_id: int) -> None:
    fulfilment.prepare_shipment(order_id, task_id=self.request.id)
