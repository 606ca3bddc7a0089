"""Relay versus plain loop on RabbitMQ, each waiting for the broker's publisher confirms.

On RabbitMQ the relay publishes on a confirm channel (``outbox.transports.amqp``): a
batch goes out without waiting between messages, then the broker's acks are awaited
together. An application that wants the same guarantee from ``apply_async`` sets
``broker_transport_options={"confirm_publish": True}``, and py-amqp then waits for each
message's confirm before the call returns. This section compares the two, side by side:
one relay process draining the outbox, as in the ``relay`` section, and a loop of
``apply_async`` calls in one process, both with the example's Celery app on a RabbitMQ
virtual host of the run's own (``outbox_bench_<pid>``, deleted when the section ends);
the loop's app differs only by ``confirm_publish``. Nobody consumes: the queue's message
count afterwards checks that every message arrived. Task-sent events on (the example's
default) and off, the four variants in a rotating order within every repeat.
"""

from __future__ import annotations

from bench.brokers import rabbitmq_vhost
from bench.context import Context, rotated
from bench.drains import plain_loop, relays
from bench.results import RATIO, Figure, Target, ratios
from outbox import OutboxSettings

SECTION = "amqp"
#: (publisher, task-sent events) of each variant.
RELAY, LOOP = "relay", "loop"
VARIANTS = ((RELAY, True), (LOOP, True), (RELAY, False), (LOOP, False))


def run(ctx: Context) -> list[Figure]:
    rows = ctx.sizes.amqp_rows
    rates: dict[tuple[str, bool], list[float]] = {variant: [] for variant in VARIANTS}
    with rabbitmq_vhost() as broker:
        confirming_loop = broker.with_options(confirm_publish=True)
        for run_index in range(ctx.repeats):
            for publisher, events in rotated(VARIANTS, run_index):
                ctx.say(
                    f"amqp: run {run_index + 1}/{ctx.repeats}, {publisher}, task events "
                    f"{'on' if events else 'off'}, {rows:,} rows"
                )
                timed = (
                    relays(ctx, rows, events=events, broker=broker)
                    if publisher == RELAY
                    else plain_loop(ctx, rows, events=events, broker=confirming_loop)
                )
                rates[publisher, events].append(timed.rate)
    relay_note = (
        f"RabbitMQ, confirm channel, batch size {OutboxSettings().batch_size}, {rows:,} rows"
    )
    loop_note = f"RabbitMQ, confirm_publish: one confirm awaited per message, {rows:,} tasks"
    figures: list[Figure] = []
    for events, label in ((True, ""), (False, ", no task events")):
        figures += [
            Figure(
                SECTION,
                f"one relay process{label}",
                "tasks/s",
                rates[RELAY, events],
                note=relay_note if events else "task_send_sent_event off",
            ),
            Figure(
                SECTION,
                f"apply_async loop, confirm_publish{label}",
                "tasks/s",
                rates[LOOP, events],
                note=loop_note if events else "task_send_sent_event off",
            ),
            Figure(
                SECTION,
                f"ratio relay / confirm_publish loop{label}",
                RATIO,
                ratios(rates[RELAY, events], rates[LOOP, events]),
                target=Target.at_least(3, RATIO),
            ),
        ]
    return figures
