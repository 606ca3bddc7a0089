"""Request path: ``POST /orders/<id>/confirm`` through the outbox vs the ``.delay()`` way.

Both variants run in the same Flask app (the example's, on PostgreSQL with the Redis
broker) through the test client, so what differs is only how the three tasks leave the
request: three outbox rows in the request's transaction, or three publishes to Redis
after its commit. Fresh pending orders are made before each run; the variants alternate
in blocks of requests, in a rotating order.

With a Redis result backend (the README's production set-up) Celery subscribes a
process that calls ``.delay()`` to each task's result channel: one more Redis round trip
per task, which the outbox's enqueue never makes. A third variant runs the ``.delay()``
view with that subscription off (as it is in workers), to show how much of the
difference it accounts for. A fourth confirms with no task at all: subtracted from the
others, it gives what the three tasks cost each way.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from sqlalchemy import Engine, text

from bench.celery_app import result_subscriptions
from bench.context import Context, rotated
from bench.data import empty_queue, empty_tables
from bench.results import RATIO, Figure, Target, differences, median, ratios

SECTION = "request"
OUTBOX, DELAY, DELAY_UNSUBSCRIBED, NO_TASKS = "outbox", "delay", "delay-unsubscribed", "none"

_NEW_ORDERS = """
INSERT INTO orders (customer_email, items, status, created_at)
SELECT 'bench@example.com', '[{"sku": "BOOK-1", "qty": 1}]', 'pending', now()
FROM generate_series(1, :count)
RETURNING id
"""


def run(ctx: Context) -> list[Figure]:
    from bench.delay_view import CONFIRM_WITH_DELAY, CONFIRM_WITHOUT_TASKS
    from bench.delay_view import bp as delay_bp
    from webapp import create_app

    app = create_app()
    app.register_blueprint(delay_bp)
    client = app.test_client()
    urls = {
        OUTBOX: "/orders/{order_id}/confirm",
        DELAY: CONFIRM_WITH_DELAY,
        DELAY_UNSUBSCRIBED: CONFIRM_WITH_DELAY,
        NO_TASKS: CONFIRM_WITHOUT_TASKS,
    }
    sizes = ctx.sizes
    blocks = max(1, sizes.requests // sizes.request_block)
    medians: dict[str, list[float]] = {name: [] for name in urls}
    samples: dict[str, list[list[float]]] = {name: [] for name in urls}

    def confirm(variant: str, order_id: int) -> float:
        url = urls[variant].format(order_id=order_id)
        with result_subscriptions(variant != DELAY_UNSUBSCRIBED):
            start = time.perf_counter_ns()
            response = client.post(url)
            elapsed = (time.perf_counter_ns() - start) / 1000
        if response.status_code != 200:
            raise RuntimeError(f"POST {url}: {response.status_code} {response.get_data()!r}")
        return elapsed

    for run_index in range(ctx.repeats):
        ctx.say(f"request: run {run_index + 1}/{ctx.repeats}")
        empty_tables(ctx.engine)
        empty_queue(ctx.redis)
        per_variant = sizes.warmup_requests + blocks * sizes.request_block
        orders = _new_orders(ctx.engine, per_variant * len(urls))
        for variant in urls:
            for _ in range(sizes.warmup_requests):
                confirm(variant, next(orders))
        times: dict[str, list[float]] = {name: [] for name in urls}
        for block in range(blocks):
            for variant in rotated(list(urls), block + run_index):
                times[variant].extend(
                    confirm(variant, next(orders)) for _ in range(sizes.request_block)
                )
        for name, values in times.items():
            medians[name].append(median(values))
            samples[name].append(values)

    requests = f"{blocks * sizes.request_block} requests per variant per run"
    # What the three tasks add to the request, each way, run by run.
    outbox_tasks = differences(medians[OUTBOX], medians[NO_TASKS])
    delay_tasks = differences(medians[DELAY], medians[NO_TASKS])
    return [
        Figure(
            SECTION,
            "confirm via outbox (3 rows in the request's transaction)",
            "µs/request",
            medians[OUTBOX],
            note=requests,
            samples=samples[OUTBOX],
        ),
        Figure(
            SECTION,
            "confirm via .delay() (3 publishes after commit)",
            "µs/request",
            medians[DELAY],
            note=requests,
            samples=samples[DELAY],
        ),
        Figure(
            SECTION,
            "confirm with no task (the request alone)",
            "µs/request",
            medians[NO_TASKS],
            note="what both ways pay: the UPDATE, the commit, Flask",
            samples=samples[NO_TASKS],
        ),
        Figure(
            SECTION,
            "the three tasks through the outbox",
            "µs/request",
            outbox_tasks,
            note="confirm via outbox - confirm with no task, per run",
        ),
        Figure(
            SECTION,
            "the three tasks with .delay()",
            "µs/request",
            delay_tasks,
            note="confirm via .delay() - confirm with no task, per run",
        ),
        Figure(
            SECTION,
            "ratio of the tasks' costs, outbox / delay",
            RATIO,
            ratios(outbox_tasks, delay_tasks),
        ),
        Figure(
            SECTION,
            "ratio outbox / delay",
            RATIO,
            ratios(medians[OUTBOX], medians[DELAY]),
            target=Target.at_most(0.6, RATIO),
        ),
        Figure(
            SECTION,
            "ratio outbox / delay without SUBSCRIBE",
            RATIO,
            ratios(medians[OUTBOX], medians[DELAY_UNSUBSCRIBED]),
            note=".delay() as it costs where Celery does not subscribe (a worker, or no Redis "
            "result backend)",
        ),
    ]


def _new_orders(engine: Engine, count: int) -> Iterator[int]:
    """Insert ``count`` pending orders at once; yield their ids in order."""
    with engine.begin() as conn:
        ids = sorted(conn.execute(text(_NEW_ORDERS), {"count": count}).scalars())
    return iter(ids)
