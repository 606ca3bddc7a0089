"""``POST /orders/<id>/confirm`` written the ``.delay()`` way, for comparison only.

The same conditional UPDATE and the same response as ``webapp.orders.confirm_order``, but
the three tasks are published with ``.delay()`` after the commit instead of being written
to the outbox before it: the dual write the outbox exists to remove. The benchmark
registers this blueprint on its own app; the example service never serves it.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint
from sqlalchemy import update

from tasks.orders import notify_customer, prepare_shipment, reserve_stock
from webapp.errors import ApiError
from webapp.extensions import db
from webapp.models import Order, OrderStatus, utcnow
from webapp.orders import MAX_ID, _get_order, _order_json

bp = Blueprint("bench_delay", __name__)

#: Where the ``.delay()`` twin of ``/orders/<id>/confirm`` is served.
CONFIRM_WITH_DELAY = "/bench/orders/{order_id}/confirm-with-delay"


@bp.post("/bench/orders/<int:order_id>/confirm-with-delay")
def confirm_with_delay(order_id: int) -> dict[str, Any]:
    if order_id > MAX_ID:
        raise ApiError(404, "not_found", f"order {order_id} does not exist.")
    changed = db.session.execute(
        update(Order)
        .where(Order.id == order_id, Order.status == OrderStatus.PENDING.value)
        .values(status=OrderStatus.CONFIRMED.value, confirmed_at=utcnow())
    ).rowcount  # type: ignore[attr-defined]
    if not changed:
        order = _get_order(order_id)
        db.session.rollback()
        raise ApiError(
            409,
            "conflict",
            f"order {order_id} is {order.status!r}; only a pending order can be confirmed.",
        )
    db.session.commit()
    tasks = {
        "notification": notify_customer.delay(order_id).id,
        "reservation": reserve_stock.delay(order_id).id,
        "shipment": prepare_shipment.delay(order_id).id,
    }
    return {**_order_json(_get_order(order_id)), "tasks": tasks}
