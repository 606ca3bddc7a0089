"""Relay versus plain loop with task-sent events off: the comparison on a leaner setup.

The example turns ``task_send_sent_event`` on so Flower sees each task the moment it is
published; that is an extra message per task for both the relay and the loop. This
section switches it off in both, so the ratio shows what batching gives where a
deployment publishes nothing but the tasks.
"""

from __future__ import annotations

from bench.context import Context, rotated
from bench.drains import plain_loop, relays
from bench.results import RATIO, Figure, Target, ratios

SECTION = "bare"
RELAY, PLAIN = "relay", "plain"


def run(ctx: Context) -> list[Figure]:
    rows = ctx.sizes.bare_rows
    rates: dict[str, list[float]] = {RELAY: [], PLAIN: []}
    for run_index in range(ctx.repeats):
        for variant in rotated(list(rates), run_index):
            ctx.say(f"bare: run {run_index + 1}/{ctx.repeats}, {variant}, {rows:,} rows")
            timed = (
                plain_loop(ctx, rows, events=False)
                if variant == PLAIN
                else relays(ctx, rows, events=False)
            )
            rates[variant].append(timed.rate)
    note = f"{rows:,} tasks, task_send_sent_event off"
    return [
        Figure(SECTION, "one relay process, no task events", "tasks/s", rates[RELAY], note=note),
        Figure(
            SECTION, "plain apply_async loop, no task events", "tasks/s", rates[PLAIN], note=note
        ),
        Figure(
            SECTION,
            "ratio relay / plain, no task events",
            RATIO,
            ratios(rates[RELAY], rates[PLAIN]),
            target=Target.at_least(3, RATIO),
        ),
    ]
