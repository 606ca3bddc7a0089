"""The orders JSON API: create, look up, confirm, ship, deliver.

Each step after creation changes the order's status and notifies the customer in the
same transaction, through the outbox, keyed by the order: the customer hears
"confirmed", "shipped" and "delivered" in that order, however many workers run the
notifications and whichever one is retried.

Creating an order is the one step a retry could repeat, so ``POST /orders`` takes an
``Idempotency-Key`` header (draft-ietf-httpapi-idempotency-key-header): the key is
stored with the order, and the same key again answers with that order instead of making
another.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, current_app, request
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import InstrumentedAttribute

from tasks.orders import notify_customer, prepare_shipment, reserve_stock
from webapp.errors import ApiError
from webapp.extensions import db, outbox
from webapp.models import (
    IDEMPOTENCY_KEY_LENGTH,
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
def create_order() -> tuple[dict[str, Any], int] | tuple[dict[str, Any], int, dict[str, str]]:
    """Create a pending order: 201. With an ``Idempotency-Key`` already used for the same
    order: that order as it is now, 200 and ``Idempotent-Replayed: true``; for another
    order: 422."""
    key = _idempotency_key()
    try:
        payload = request.get_json(force=True, silent=True)
    except RecursionError:  # absurdly deep nesting: not an order either
        payload = None
    email, items = _parse_new_order(payload)
    if key is not None and (earlier := _order_with_key(key)) is not None:
        return _replay(earlier, key, email, items)
    order = Order(
        customer_email=email, items=items, status=OrderStatus.PENDING.value, idempotency_key=key
    )
    db.session.add(order)
    try:
        db.session.commit()
    except IntegrityError:
        # A concurrent request with the same key committed first: the unique key decided,
        # and this request answers with the winner's order.
        db.session.rollback()
        winner = _order_with_key(key) if key is not None else None
        if winner is None:
            raise
        return _replay(winner, key, email, items)
    return _order_json(order), 201


def _idempotency_key() -> str | None:
    """The request's ``Idempotency-Key``, or ``None``; 400 if it cannot be one."""
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    if not 1 <= len(key) <= IDEMPOTENCY_KEY_LENGTH or not key.isprintable():
        raise ApiError(
            400,
            "invalid_request",
            f"Idempotency-Key={key[:IDEMPOTENCY_KEY_LENGTH]!r} must be 1 to "
            f"{IDEMPOTENCY_KEY_LENGTH} printable characters, e.g. a UUID.",
        )
    return key


def _order_with_key(key: str) -> Order | None:
    return db.session.scalars(select(Order).where(Order.idempotency_key == key)).one_or_none()


def _replay(
    order: Order, key: str, email: str, items: list[dict[str, Any]]
) -> tuple[dict[str, Any], int, dict[str, str]]:
    """The order a key made, if this request asks for the same order (compared as parsed,
    so a retry that serialises its JSON differently is still the same request)."""
    if (order.customer_email, order.items) != (email, items):
        raise ApiError(
            422,
            "idempotency_key_reused",
            f"Idempotency-Key {key!r} was already used for a different order; "
            "use a new key for a new order.",
        )
    return _order_json(order), 200, {"Idempotent-Replayed": "true"}


@bp.get("/orders/<int:order_id>")
def get_order(order_id: int) -> dict[str, Any]:
    return _order_json(_get_order(order_id), with_effects=True)


@bp.post("/orders/<int:order_id>/confirm")
def confirm_order(order_id: int) -> dict[str, Any]:
    order = mark_confirmed(order_id)
    tasks = {
        "notification": notify(order_id, OrderStatus.CONFIRMED),
        "reservation": outbox.delay(reserve_stock, order_id).id,
        "shipment": outbox.delay(prepare_shipment, order_id).id,
    }
    return _commit_and_answer(order, tasks)


@bp.post("/orders/<int:order_id>/ship")
def ship_order(order_id: int) -> dict[str, Any]:
    order = advance(order_id, OrderStatus.CONFIRMED, OrderStatus.SHIPPED, Order.shipped_at)
    return _commit_and_answer(order, {"notification": notify(order_id, OrderStatus.SHIPPED)})


@bp.post("/orders/<int:order_id>/deliver")
def deliver_order(order_id: int) -> dict[str, Any]:
    order = advance(order_id, OrderStatus.SHIPPED, OrderStatus.DELIVERED, Order.delivered_at)
    return _commit_and_answer(order, {"notification": notify(order_id, OrderStatus.DELIVERED)})


def _commit_and_answer(order: Order, tasks: dict[str, str]) -> dict[str, Any]:
    """Commit the step, answering with the order as the transaction left it.

    The answer is built before the commit, from the row the UPDATE returned: reading the
    order again after it would take a connection from the pool a second time (and ping
    it), run one more SELECT and roll its transaction back at the request's end.
    """
    body = {**_order_json(order), "tasks": tasks}
    db.session.commit()
    return body


def notify(order_id: int, event: OrderStatus) -> str:
    """Enqueue the customer's notice of ``event``, after the order's earlier ones
    (``ORDERS_ORDERED_NOTIFICATIONS=false`` drops the ordering, to see what it prevents)."""
    if current_app.config.get("ORDERS_ORDERED_NOTIFICATIONS", True):
        return outbox.ordered(f"order:{order_id}").delay(notify_customer, order_id, event.value).id
    return outbox.delay(notify_customer, order_id, event.value).id


def mark_confirmed(order_id: int) -> Order:
    """Confirm a pending order in the session's transaction, or raise 404 / 409."""
    return advance(order_id, OrderStatus.PENDING, OrderStatus.CONFIRMED, Order.confirmed_at)


def advance(
    order_id: int,
    current: OrderStatus,
    new: OrderStatus,
    stamp: InstrumentedAttribute[Any],
) -> Order:
    """Move an order from ``current`` to ``new`` in the session's transaction and return
    it, or raise 404 / 409.

    A conditional UPDATE is the state check and the lock in one statement: of two
    concurrent requests exactly one sees a row change, so tasks are enqueued once. Where
    the database has UPDATE … RETURNING (PostgreSQL, SQLite) it is the read too; MariaDB
    and MySQL read the changed row after it, in the same transaction.
    """
    if order_id > MAX_ID:
        raise ApiError(404, "not_found", f"order {order_id} does not exist.")
    change = (
        update(Order)
        .where(Order.id == order_id, Order.status == current.value)
        .values({Order.status: new.value, stamp: utcnow()})
    )
    changed: Order | None
    if db.session.get_bind().dialect.update_returning:
        changed = db.session.scalars(change.returning(Order)).one_or_none()
    else:
        rows = db.session.execute(change).rowcount  # type: ignore[attr-defined]
        changed = db.session.get(Order, order_id) if rows else None
    if changed is not None:
        return changed
    order = _get_order(order_id)
    db.session.rollback()
    raise ApiError(
        409,
        "conflict",
        f"order {order_id} is {order.status!r}; only a {current.value} order can be {new.value}.",
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
        "shipped_at": order.shipped_at.isoformat() if order.shipped_at else None,
        "delivered_at": order.delivered_at.isoformat() if order.delivered_at else None,
    }
    if with_effects:
        # The confirmation's three effects; the notification counted is the confirmation's.
        body["effects"] = {
            name: db.session.scalar(
                select(func.count())
                .select_from(model)
                .where(model.order_id == order.id)
                .where(
                    Notification.event == OrderStatus.CONFIRMED.value
                    if model is Notification
                    else True
                )
            )
            for name, model in EFFECTS.items()
        }
        body["timeline"] = timeline(order.id)
    return body


def timeline(order_id: int) -> list[str]:
    """The notices the customer received, in the order they were applied."""
    return list(
        db.session.scalars(
            select(Notification.event)
            .where(Notification.order_id == order_id)
            .order_by(Notification.id)
        )
    )


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
