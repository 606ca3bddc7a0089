"""Order fulfilment tasks: thin wrappers that call plain functions in ``webapp.fulfilment``."""

from __future__ import annotations

from typing import Any

from tasks.application import app
from webapp import fulfilment


@app.task(name="orders.notify_customer", bind=True)
def notify_customer(self: Any, order_id: int) -> None:
    fulfilment.notify_customer(order_id, task_id=self.request.id)


@app.task(name="orders.reserve_stock", bind=True)
def reserve_stock(self: Any, order_id: int) -> None:
    fulfilment.reserve_stock(order_id, task_id=self.request.id)


@app.task(name="orders.prepare_shipment", bind=True)
def prepare_shipment(self: Any, order_id: int) -> None:
    fulfilment.prepare_shipment(order_id, task_id=self.request.id)
