"""The three accidents, each played with ``.delay()`` and then through the outbox.

Every figure is counted from what the tasks did: the notices in the database, the
messages the broker took. Nothing is written in.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kombu.exceptions import OperationalError
from sqlalchemy.orm import Session

from webapp.accidents.broker import FAULTS
from webapp.accidents.stage import WORKER_THREADS, Stage
from webapp.models import OrderStatus

#: The steps of an order after its creation, and the notice each sends.
STEPS = (OrderStatus.CONFIRMED, OrderStatus.SHIPPED, OrderStatus.DELIVERED)
#: Of the broken-order scenario's orders, every this many has its first notice retried.
RETRY_EVERY = 5

Scenario = Callable[[Stage, int], dict[str, Any]]


def lost_send(stage: Stage, orders: int) -> dict[str, Any]:
    """The broker is down when the order commits."""
    failed_publishes = 0
    with_delay = []
    FAULTS.reset()
    FAULTS.down = True
    for number in range(orders):
        order_id = stage.new_order(number)
        with_delay.append(order_id)
        try:
            stage.advance(order_id, OrderStatus.CONFIRMED, _commit_then_delay(stage, order_id))
        except OperationalError:
            failed_publishes += 1  # the view answers 500; the order stays confirmed
    FAULTS.down = False
    stage.settle()

    FAULTS.reset()
    FAULTS.down = True
    with_outbox = []
    for number in range(orders):
        order_id = stage.new_order(number)
        with_outbox.append(order_id)
        stage.advance(order_id, OrderStatus.CONFIRMED, _through_outbox(stage, order_id))
    waited = stage.waiting_in_outbox()
    FAULTS.down = False
    stage.settle()

    notices = stage.notices()
    return {
        "delay": sum(1 for order_id in with_delay if not notices.get(order_id)),
        "outbox": sum(1 for order_id in with_outbox if not notices.get(order_id)),
        "orders": orders,
        "delay_publish_errors": failed_publishes,
        "outbox_waited_for_the_broker": waited,
    }


def double_send(stage: Stage, orders: int) -> dict[str, Any]:
    """The broker takes each message, and its acknowledgement is lost: the publisher
    times out and sends again."""
    with_delay, delay_messages = _confirm_with_acks_lost(stage, orders, _commit_then_delay)
    with_outbox, outbox_messages = _confirm_with_acks_lost(stage, orders, _through_outbox)

    notices = stage.notices()
    return {
        "delay": sum(1 for order_id in with_delay if len(notices.get(order_id, [])) > 1),
        "outbox": sum(1 for order_id in with_outbox if len(notices.get(order_id, [])) > 1),
        "orders": orders,
        "delay_messages_on_the_broker": delay_messages,
        "outbox_messages_on_the_broker": outbox_messages,
    }


def _confirm_with_acks_lost(
    stage: Stage, orders: int, way: Callable[[Stage, int], Callable[[Session], None]]
) -> tuple[list[int], int]:
    """Confirm ``orders`` orders, each sending its notice ``way``, while the first
    publish of each notice loses its acknowledgement; return the orders and how many
    messages the broker took."""
    FAULTS.reset()
    FAULTS.acks_lost = True
    order_ids = [stage.new_order(number) for number in range(orders)]
    for order_id in order_ids:
        stage.advance(order_id, OrderStatus.CONFIRMED, way(stage, order_id))
    stage.settle()
    written = FAULTS.written
    FAULTS.reset()
    return order_ids, written


def broken_order(stage: Stage, orders: int) -> dict[str, Any]:
    """Confirmed, shipped, delivered back to back, on the worker's concurrent threads
    with a sending latency, and every fifth order's first notice retried."""
    FAULTS.reset()
    with_delay = _take_orders_through(stage, orders, ordered=False)
    stage.settle()
    with_outbox = _take_orders_through(stage, orders, ordered=True)
    stage.settle()

    notices = stage.notices()
    delay_late = {order_id: _out_of_order(notices.get(order_id, [])) for order_id in with_delay}
    outbox_late = {order_id: _out_of_order(notices.get(order_id, [])) for order_id in with_outbox}
    return {
        "delay": sum(delay_late.values()),
        "outbox": sum(outbox_late.values()),
        "orders": orders,
        "notices_per_order": len(STEPS),
        "delay_orders_out_of_order": sum(1 for late in delay_late.values() if late),
        "outbox_orders_out_of_order": sum(1 for late in outbox_late.values() if late),
        "example_delay_timeline": next(
            (notices[order_id] for order_id, late in delay_late.items() if late), None
        ),
        "worker_threads": WORKER_THREADS,
        "latency_ms": stage.latency_ms,
        "retried": len(range(0, orders, RETRY_EVERY)),
    }


def _take_orders_through(stage: Stage, orders: int, *, ordered: bool) -> list[int]:
    order_ids = [stage.new_order(number) for number in range(orders)]
    stage.retry_once.update(
        (order_id, OrderStatus.CONFIRMED.value) for order_id in order_ids[::RETRY_EVERY]
    )
    for order_id in order_ids:
        for step in STEPS:
            enqueue = (
                _through_outbox(stage, order_id, step, key=f"order:{order_id}")
                if ordered
                else _commit_then_delay(stage, order_id, step)
            )
            stage.advance(order_id, step, enqueue)
    return order_ids


def _out_of_order(timeline: list[str]) -> int:
    """Notices applied before one that was committed earlier."""
    rank = {step.value: index for index, step in enumerate(STEPS)}
    return sum(
        1
        for position, event in enumerate(timeline)
        if any(rank[later] < rank[event] for later in timeline[position + 1 :])
    )


def _commit_then_delay(
    stage: Stage, order_id: int, step: OrderStatus = OrderStatus.CONFIRMED
) -> Callable[[Session], None]:
    """What a view does today: commit, then ``.delay()``."""

    def enqueue(session: Session) -> None:
        session.commit()
        stage.celery_app.tasks["accidents.notify"].delay(order_id, step.value)

    return enqueue


def _through_outbox(
    stage: Stage,
    order_id: int,
    step: OrderStatus = OrderStatus.CONFIRMED,
    *,
    key: str | None = None,
) -> Callable[[Session], None]:
    """The outbox's way: the task is a row in the same transaction."""

    def enqueue(session: Session) -> None:
        stage.outbox.apply_async(
            "accidents.notify_once", (order_id, step.value), session=session, ordering_key=key
        )
        session.commit()

    return enqueue


SCENARIOS: dict[str, Scenario] = {
    "lost_send": lost_send,
    "double_send": double_send,
    "broken_order": broken_order,
}
