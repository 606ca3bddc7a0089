"""Batch-size sweep: one relay process's throughput at each batch size, to choose the
default from measurement. Batch sizes take turns in a rotating order within each repeat."""

from __future__ import annotations

from bench.context import Context, rotated
from bench.drains import relays
from bench.results import Figure
from outbox import OutboxSettings

SECTION = "batch"


def run(ctx: Context) -> list[Figure]:
    rows = ctx.sizes.batch_rows
    sizes = ctx.sizes.batch_sizes
    rates: dict[int, list[float]] = {size: [] for size in sizes}
    for run_index in range(ctx.repeats):
        for size in rotated(sizes, run_index):
            ctx.say(f"batch: run {run_index + 1}/{ctx.repeats}, batch size {size}")
            rates[size].append(relays(ctx, rows, batch_size=size).rate)
    default = OutboxSettings().batch_size
    return [
        Figure(
            SECTION,
            f"one relay, batch size {size}" + (" (default)" if size == default else ""),
            "tasks/s",
            rates[size],
            note=f"{rows:,} rows",
        )
        for size in sizes
    ]
