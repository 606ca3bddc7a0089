"""Backlog scaling: the time to claim one batch beside 0, 100,000 and 1,000,000 dispatched
rows.

Each level gets its own copy of the outbox table, in a schema of its own, holding
``batch_size`` due pending rows and that many dispatched ones (inserted server-side,
then VACUUM ANALYZE), and the relay's claim is timed against each in turn
(:mod:`bench.claims`).
"""

from __future__ import annotations

from sqlalchemy import Engine

from bench.claims import CLAIM, SERVER, time_claims
from bench.context import Context
from bench.data import add_dispatched, add_pending, analyze, schemas_of_its_own
from bench.results import RATIO, Figure, Target, ratios
from outbox import OutboxSettings, Relay

SECTION = "backlog"


def run(ctx: Context) -> list[Figure]:
    settings = OutboxSettings()
    relay = Relay(ctx.engine, ctx.celery_app, settings)
    levels = ctx.sizes.backlog_levels
    with schemas_of_its_own(ctx.engine, ctx.services.database_url) as make:
        tables: dict[int, Engine] = {}
        for level in levels:
            ctx.say(f"backlog: filling {level:,} dispatched rows beside {settings.batch_size}")
            tables[level] = _fill(make(f"bench_backlog_{level}"), level, settings.batch_size)
        timed = time_claims(ctx, SECTION, tables, relay, settings.batch_size)
    claims, server = timed.medians[CLAIM], timed.medians[SERVER]
    rounds = f"median of {ctx.sizes.claim_rounds} claims per run, as the relay sees them"
    smallest, largest = levels[0], levels[-1]
    return [
        *(
            Figure(
                SECTION,
                f"claim {settings.batch_size} rows beside {level:,} dispatched",
                "ms",
                claims[level],
                note=rounds if level == smallest else "",
                samples=timed.samples[CLAIM][level],
            )
            for level in levels
        ),
        Figure(
            SECTION,
            f"ratio {largest:,} / {smallest:,} dispatched",
            RATIO,
            ratios(claims[largest], claims[smallest]),
            target=Target.at_most(1.5, RATIO),
        ),
        *(
            Figure(
                SECTION,
                f"  server execution beside {level:,} dispatched",
                "ms",
                server[level],
                note="EXPLAIN ANALYZE execution time" if level == smallest else "",
            )
            for level in levels
        ),
    ]


def _fill(engine: Engine, level: int, pending: int) -> Engine:
    """Fill the level's table: ``level`` dispatched rows beside ``pending`` due ones."""
    add_dispatched(engine, level)
    add_pending(engine, pending)
    analyze(engine, vacuum=True)
    return engine
