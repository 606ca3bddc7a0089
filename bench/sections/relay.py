"""Relay throughput: one relay process, two at once, and a plain ``apply_async`` loop.

Each run drains the same number of pending rows (or, for the plain loop, publishes as
many tasks) into an unconsumed Redis queue; the three variants take turns in a rotating
order within every repeat, so each ratio compares runs made moments apart.
"""

from __future__ import annotations

from bench.context import Context, rotated
from bench.drains import plain_loop, relays
from bench.results import RATIO, Figure, Target, ratios
from outbox import OutboxSettings

SECTION = "relay"
RELAY1, RELAY2, PLAIN = "relay1", "relay2", "plain"


def run(ctx: Context) -> list[Figure]:
    rows = ctx.sizes.relay_rows
    rates: dict[str, list[float]] = {RELAY1: [], RELAY2: [], PLAIN: []}
    for run_index in range(ctx.repeats):
        for variant in rotated(list(rates), run_index):
            ctx.say(f"relay: run {run_index + 1}/{ctx.repeats}, {variant}, {rows:,} rows")
            if variant == PLAIN:
                timed = plain_loop(ctx, rows)
            else:
                timed = relays(ctx, rows, processes=1 if variant == RELAY1 else 2)
            rates[variant].append(timed.rate)
    batch = f"batch size {OutboxSettings().batch_size}, {rows:,} rows"
    return [
        Figure(SECTION, "one relay process", "tasks/s", rates[RELAY1], note=batch),
        Figure(SECTION, "two relay processes at once", "tasks/s", rates[RELAY2], note=batch),
        Figure(
            SECTION,
            "plain apply_async loop, one process",
            "tasks/s",
            rates[PLAIN],
            note=f"{rows:,} tasks",
        ),
        Figure(
            SECTION,
            "ratio relay1 / plain",
            RATIO,
            ratios(rates[RELAY1], rates[PLAIN]),
            target=Target.at_least(3, RATIO),
        ),
        Figure(
            SECTION,
            "ratio relay2 / relay1",
            RATIO,
            ratios(rates[RELAY2], rates[RELAY1]),
            target=Target.at_least(1.5, RATIO),
        ),
    ]
