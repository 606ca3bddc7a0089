"""What confirming an order sets in motion; the Celery tasks are thin wrappers around these.

Each function records its effect in ``db.session`` and leaves the commit to its caller:
the idempotent task wrapper commits the effect together with the record that the task
ran, so a repeated delivery cannot apply it twice.
"""

from __future__ import annotations

import logging
import random
import time

from flask import current_app

from webapp.extensions import db
from webapp.models import Notification, Order, OrderStatus, Shipment, StockReservation

logger = logging.getLogger(__name__)


def _send_latency() -> None:
    """Wait as long as a real send might: random, up to ``ORDERS_TASK_LATENCY_MS``
    (default 0). A few milliseconds are enough for unordered tasks on two workers to
    overtake each other."""
    ceiling = float(current_app.config.get("ORDERS_TASK_LATENCY_MS") or 0)
    if ceiling > 0:
        time.sleep(random.uniform(0, ceiling) / 1000)  # noqa: S311 - a simulation, not security


def _order(order_id: int) -> Order:
    order = db.session.get(Order, order_id)
    if order is None:
        raise LookupError(f"order {order_id} does not exist")
    return order


def notify_customer(order_id: int, task_id: str, event: str = OrderStatus.CONFIRMED.value) -> None:
    order = _order(order_id)
    _send_latency()
    db.session.add(
        Notification(
            order_id=order.id, task_id=task_id, recipient=order.customer_email, event=event
        )
    )
    logger.info("order %s: %s notice sent to %s", order.id, event, order.customer_email)


def reserve_stock(order_id: int, task_id: str) -> None:
    order = _order(order_id)
    _send_latency()
    db.session.add(StockReservation(order_id=order.id, task_id=task_id, items=order.items))
    logger.info("order %s: stock reserved for %d item(s)", order.id, len(order.items))


def prepare_shipment(order_id: int, task_id: str) -> None:
    order = _order(order_id)
    _send_latency()
    db.session.add(Shipment(order_id=order.id, task_id=task_id))
    logger.info("order %s: shipment being prepared", order.id)
