"""Timed publishing runs in child processes: relays draining the outbox, or a plain loop.

Each run starts from an empty outbox table and an empty queue; nobody consumes, so the
queue's length afterwards checks that every message arrived. Rates count from the moment
the children were told to go (after they imported and connected) to the last one's end.
The broker is the run's Redis DB unless a :class:`bench.brokers.Broker` says otherwise
(a RabbitMQ virtual host).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bench.brokers import Broker, RedisBroker
from bench.children import Child
from bench.context import Context
from bench.data import DEFAULT_QUEUE, add_pending, count_status, empty_tables


@dataclass(frozen=True, slots=True)
class Timed:
    """What one run published, and over how long (all children together)."""

    published: int
    seconds: float
    #: Each child's own report (published, batches, start, end).
    children: list[dict[str, Any]]

    @property
    def rate(self) -> float:
        return self.published / self.seconds


def _timeout(rows: int) -> float:
    """Generous: a run that takes this long is broken, not slow."""
    return 120 + rows / 200


def relays(
    ctx: Context,
    rows: int,
    *,
    processes: int = 1,
    batch_size: int | None = None,
    task_name: str = "orders.notify_customer",
    options: dict[str, Any] | None = None,
    queue: str = DEFAULT_QUEUE,
    consumed: bool = False,
    events: bool = True,
    broker: Broker | None = None,
) -> Timed:
    """Fill ``rows`` pending rows and drain them with ``processes`` relay processes at once.

    ``consumed`` says workers are taking messages off the queue, so its length proves
    nothing and is not checked.
    """
    broker = broker or RedisBroker(ctx.redis)
    extra = ["--batch-size", str(batch_size)] if batch_size else []
    if not events:
        extra.append("--no-events")
    # Started first: they import and connect while the rows go in, and wait for "go".
    children = [
        Child.bench(f"relay-{index}", ctx.services.work_dir, "relay", *extra, env=broker.env)
        for index in range(processes)
    ]
    try:
        empty_tables(ctx.engine)
        broker.empty_queue(queue)
        add_pending(ctx.engine, rows, task_name, options)
        for child in children:
            child.expect("ready")
        for child in children:
            child.send("go")
        reports = [child.result(_timeout(rows)) for child in children]
        for child in children:
            child.wait(30)
    finally:
        for child in children:
            child.stop()
    timed = _timed(reports)
    _check(broker, timed, rows, queue, consumed=consumed)
    left = count_status(ctx.engine, "pending")
    if left:
        raise RuntimeError(f"{left} of {rows} rows are still pending after the drain")
    return timed


def plain_loop(
    ctx: Context,
    count: int,
    task_name: str = "orders.notify_customer",
    *,
    events: bool = True,
    broker: Broker | None = None,
) -> Timed:
    """``count`` ``apply_async`` calls in a loop from one process: publishing without the
    outbox, to the same broker."""
    broker = broker or RedisBroker(ctx.redis)
    empty_tables(ctx.engine)
    broker.empty_queue(DEFAULT_QUEUE)
    extra = [] if events else ["--no-events"]
    child = Child.bench(
        "plain",
        ctx.services.work_dir,
        "plain",
        "--count",
        str(count),
        "--task",
        task_name,
        *extra,
        env=broker.env,
    )
    try:
        child.expect("ready")
        child.send("go")
        report = child.result(_timeout(count))
        child.wait(30)
    finally:
        child.stop()
    timed = _timed([report])
    _check(broker, timed, count, DEFAULT_QUEUE, consumed=False)
    return timed


def _timed(reports: list[dict[str, Any]]) -> Timed:
    start = min(report["start"] for report in reports)
    end = max(report["end"] for report in reports)
    return Timed(sum(report["published"] for report in reports), end - start, reports)


def _check(broker: Broker, timed: Timed, expected: int, queue: str, *, consumed: bool) -> None:
    if timed.published != expected:
        raise RuntimeError(f"published {timed.published} messages, expected {expected}")
    if not consumed:
        found = broker.settled_length(queue, expected)
        if found != expected:
            raise RuntimeError(f"queue {queue!r} holds {found} messages, expected {expected}")
        broker.empty_queue(queue)
