"""Orders, and one table per effect a task applies, so "ran exactly once" is countable."""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, ForeignKey, String
from sqlalchemy.dialects import mysql
from sqlalchemy.orm import Mapped, mapped_column

from outbox.data.schema import UTCDateTime
from webapp.extensions import db

#: The longest ``Idempotency-Key`` accepted (Stripe's limit; a UUID is 36).
IDEMPOTENCY_KEY_LENGTH = 255
#: Keys compare case-sensitively: MariaDB's and MySQL's default collations ignore case,
#: which would make ``abc`` replay the order ``ABC`` made.
IDEMPOTENCY_KEY = String(IDEMPOTENCY_KEY_LENGTH).with_variant(
    mysql.VARCHAR(IDEMPOTENCY_KEY_LENGTH, charset="utf8mb4", collation="utf8mb4_bin"),
    "mysql",
    "mariadb",
)


def utcnow() -> datetime:
    return datetime.now(UTC)


class OrderStatus(enum.StrEnum):
    """An order's life: each step after ``pending`` notifies the customer."""

    PENDING = "pending"
    CONFIRMED = "confirmed"
    SHIPPED = "shipped"
    DELIVERED = "delivered"


class Order(db.Model):  # type: ignore[name-defined,misc]
    __tablename__ = "orders"

    id: Mapped[int] = mapped_column(primary_key=True)
    customer_email: Mapped[str] = mapped_column(String(254))
    items: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16), default=OrderStatus.PENDING.value)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    confirmed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    shipped_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    #: The client's ``Idempotency-Key`` for the POST that made it: unique, so of two
    #: requests with one key only one can commit an order, in the order's own transaction.
    idempotency_key: Mapped[str | None] = mapped_column(IDEMPOTENCY_KEY, unique=True)


class _Effect:
    """Columns every effect row has: which order, and which task run applied it."""

    id: Mapped[int] = mapped_column(primary_key=True)
    order_id: Mapped[int] = mapped_column(ForeignKey("orders.id"), index=True)
    task_id: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Notification(_Effect, db.Model):  # type: ignore[name-defined,misc]
    """An email the customer was sent (the demo logs it instead of sending); the
    customer's timeline is these, in the order they were applied."""

    __tablename__ = "notifications"

    recipient: Mapped[str] = mapped_column(String(254))
    #: What it told the customer: the order's status it announces.
    event: Mapped[str] = mapped_column(String(16), default=OrderStatus.CONFIRMED.value)


class StockReservation(_Effect, db.Model):  # type: ignore[name-defined,misc]
    __tablename__ = "stock_reservations"

    items: Mapped[list[dict[str, Any]]] = mapped_column(JSON)


class Shipment(_Effect, db.Model):  # type: ignore[name-defined,misc]
    __tablename__ = "shipments"

    status: Mapped[str] = mapped_column(String(16), default="preparing")
