"""``POST /orders/<id>/confirm`` written the ``.delay()`` way, for comparison only.

The same conditional UPDATE and the same response as ``webapp.orders.confirm_order``, but
the three tasks are published with ``.delay()`` after the commit instead of being written
to the outbox before it: the dual write the outbox exists to remove. The benchmark
registers this blueprint on its own app; the example service never serves it. It also
serves a twin that confirms without any task, so that what the three tasks cost each way
can be told from what the request costs on its own.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint

from tasks.orders import notify_customer, prepare_shipment, reserve_stock
from webapp.extensions import db
from webapp.orders import _order_json, mark_confirmed

bp = Blueprint("bench_delay", __name__)

#: Where the ``.delay()`` twin of ``/orders/<id>/confirm`` is served.
CONFIRM_WITH_DELAY = "/bench/orders/{order_id}/confirm-with-delay"
#: Where its twin without any task is: the request's own cost, which both ways pay.
CONFIRM_WITHOUT_TASKS = "/bench/orders/{order_id}/confirm-without-tasks"


@bp.post("/bench/orders/<int:order_id>/confirm-with-delay")
def confirm_with_delay(order_id: int) -> dict[str, Any]:
    order = _order_json(mark_confirmed(order_id))
    db.session.commit()
    tasks = {
        "notification": notify_customer.delay(order_id).id,
        "reservation": reserve_stock.delay(order_id).id,
        "shipment": prepare_shipment.delay(order_id).id,
    }
    return {**order, "tasks": tasks}


@bp.post("/bench/orders/<int:order_id>/confirm-without-tasks")
def confirm_without_tasks(order_id: int) -> dict[str, Any]:
    order = _order_json(mark_confirmed(order_id))
    db.session.commit()
    return {**order, "tasks": {}}
