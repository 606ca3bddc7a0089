"""The orders JSON API: create, look up, confirm."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, request
from sqlalchemy import func, select, update

from tasks.orders import notify_customer, prepare_shipment, reserve_stock
from webapp.errors import ApiError
from webapp.extensions import db, outbox
from webapp.models import (
    Notification,
    Order,
    OrderStatus,
    Shipment,
    StockReservation,
    utcnow,
)

bp = Blueprint("orders", __name__)

MAX_ITEMS = 100
MAX_QTY = 10_000
#: Larger ids cannot exist (the id column is a 32-bit INTEGER) and would overflow the
#: database's integer parameter.
MAX_ID = 2**31 - 1
EFFECTS = {"notification": Notification, "reservation": StockReservation, "shipment": Shipment}


@bp.post("/orders")
def create_order() -> tuple[dict[str, Any], int]:
    try:
        payload = request.get_json(force=True, silent=True)
    except RecursionError:  # absurdly deep nesting: not an order either
        payload = None
    email, items = _parse_new_order(payload)
    order = Order(customer_email=email, items=items, status=OrderStatus.PENDING.value)
    db.session.add(order)
    db.session.commit()
    return _order_json(order), 201


@bp.get("/orders/<int:order_id>")
def get_order(order_id: int) -> dict[str, Any]:
    return _order_json(_get_order(order_id), with_effects=True)


@bp.post("/orders/<int:order_id>/confirm")
def confirm_order(order_id: int) -> dict[str, Any]:
    mark_confirmed(order_id)
    tasks = {
        "notification": outbox.delay(notify_customer, order_id).id,
        "reservation": outbox.delay(reserve_stock, order_id).id,
        "shipment": outbox.delay(prepare_shipment, order_id).id,
    }
    db.session.commit()
    return {**_order_json(_get_order(order_id)), "tasks": tasks}


def mark_confirmed(order_id: int) -> None:
    """Confirm a pending order in the session's transaction, or raise 404 / 409.

    A conditional UPDATE is the state check and the lock in one statement: of two
    concurrent confirmations exactly one sees a row change, so tasks are enqueued once.
    """
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


def _get_order(order_id: int) -> Order:
    order = db.session.get(Order, order_id) if order_id <= MAX_ID else None
    if order is None:
        raise ApiError(404, "not_found", f"order {order_id} does not exist.")
    return order


def _order_json(order: Order, *, with_effects: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": order.id,
        "customer_email": order.customer_email,
        "items": order.items,
        "status": order.status,
        "created_at": order.created_at.isoformat(),
        "confirmed_at": order.confirmed_at.isoformat() if order.confirmed_at else None,
    }
    if with_effects:
        body["effects"] = {
            name: db.session.scalar(
                select(func.count()).select_from(model).where(model.order_id == order.id)
            )
            for name, model in EFFECTS.items()
        }
    return body


def _parse_new_order(payload: Any) -> tuple[str, list[dict[str, Any]]]:
    if not isinstance(payload, dict):
        raise ApiError(
            400,
            "invalid_request",
            'the body must be a JSON object like {"customer_email": "a@example.com", '
            '"items": [{"sku": "BOOK-1", "qty": 1}]}.',
        )
    email = payload.get("customer_email")
    if (
        not isinstance(email, str)
        or "@" not in email.strip(" @")
        or len(email) > 254
        or not email.isprintable()
    ):
        raise ApiError(400, "invalid_request", f"customer_email={email!r} is not an email address.")
    items = payload.get("items")
    if not isinstance(items, list) or not 1 <= len(items) <= MAX_ITEMS:
        raise ApiError(
            400,
            "invalid_request",
            f"items must be a list of 1 to {MAX_ITEMS} items, got {items!r}.",
        )
    parsed = []
    for index, item in enumerate(items):
        sku = item.get("sku") if isinstance(item, dict) else None
        qty = item.get("qty") if isinstance(item, dict) else None
        if not isinstance(sku, str) or not sku.strip() or len(sku) > 64 or not sku.isprintable():
            raise ApiError(
                400, "invalid_request", f"items[{index}].sku={sku!r} must be a SKU string."
            )
        if isinstance(qty, bool) or not isinstance(qty, int) or not 1 <= qty <= MAX_QTY:
            raise ApiError(
                400,
                "invalid_request",
                f"items[{index}].qty={qty!r} must be an integer from 1 to {MAX_QTY}.",
            )
        parsed.append({"sku": sku.strip(), "qty": qty})
    return email.strip(), parsed
