"""Backlog scaling: the time to claim one batch beside 0, 100,000 and 1,000,000 dispatched
rows.

Each level gets its own copy of the outbox table, in a schema of its own, holding
``batch_size`` due pending rows and that many dispatched ones (inserted server-side,
then VACUUM ANALYZE). One connection per level has its ``search_path`` set to that schema,
so the relay's own ``claim_query()`` runs unchanged against each, and the levels are
timed in turn, round after round, instead of one after another: a slower moment of the
machine then hits every level alike. Each claim runs in a transaction that is rolled
back, so the same rows are claimed every time.

The claim's time as the relay sees it includes turning 200 rows into Python objects
(JSONB, UUIDs, timestamps), which costs the same at every level; the server's own
execution time (``EXPLAIN ANALYZE`` of the same statement, timed in the same rounds) is
reported beside it, since that is the part a backlog could slow down.
"""

from __future__ import annotations

import json
import time

from sqlalchemy import Connection, Engine, text

from bench.context import Context, rotated
from bench.data import add_dispatched, add_pending, analyze, schema_of_its_own
from bench.results import RATIO, Figure, Target, median, ratios
from outbox import OutboxSettings, Relay

SECTION = "backlog"


def run(ctx: Context) -> list[Figure]:
    settings = OutboxSettings()
    relay = Relay(ctx.engine, ctx.celery_app, settings)
    levels = ctx.sizes.backlog_levels
    engines: dict[int, Engine] = {}
    connections: dict[int, Connection] = {}
    timings: dict[int, list[float]] = {level: [] for level in levels}
    samples: dict[int, list[list[float]]] = {level: [] for level in levels}
    server: dict[int, list[float]] = {level: [] for level in levels}
    try:
        for level in levels:
            ctx.say(f"backlog: filling {level:,} dispatched rows beside {settings.batch_size}")
            engines[level] = _fill(ctx, level, settings.batch_size)
            connections[level] = engines[level].connect()
        for run_index in range(ctx.repeats):
            ctx.say(f"backlog: run {run_index + 1}/{ctx.repeats}")
            claims: dict[int, list[float]] = {level: [] for level in levels}
            executions: dict[int, list[float]] = {level: [] for level in levels}
            for round_index in range(ctx.sizes.claim_rounds + 5):
                for level in rotated(levels, round_index):
                    elapsed = _claim(connections[level], relay, settings.batch_size)
                    executed = _server_time(connections[level], relay)
                    # The first rounds warm caches and connections.
                    if round_index >= 5:
                        claims[level].append(elapsed)
                        executions[level].append(executed)
            for level in levels:
                timings[level].append(median(claims[level]))
                samples[level].append(claims[level])
                server[level].append(median(executions[level]))
    finally:
        for conn in connections.values():
            conn.close()
        for engine in engines.values():
            engine.dispose()
        with ctx.engine.begin() as conn:
            for level in levels:
                conn.execute(text(f"DROP SCHEMA IF EXISTS {_schema(level)} CASCADE"))
    rounds = f"median of {ctx.sizes.claim_rounds} claims per run, as the relay sees them"
    figures = [
        Figure(
            SECTION,
            f"claim {settings.batch_size} rows beside {level:,} dispatched",
            "ms",
            timings[level],
            note=rounds if level == levels[0] else "",
            samples=samples[level],
        )
        for level in levels
    ]
    smallest, largest = levels[0], levels[-1]
    figures.append(
        Figure(
            SECTION,
            f"ratio {largest:,} / {smallest:,} dispatched",
            RATIO,
            ratios(timings[largest], timings[smallest]),
            target=Target.at_most(1.5, RATIO),
        )
    )
    figures.extend(
        Figure(
            SECTION,
            f"  server execution beside {level:,} dispatched",
            "ms",
            server[level],
            note="EXPLAIN ANALYZE execution time" if level == levels[0] else "",
        )
        for level in levels
    )
    figures.append(
        Figure(
            SECTION,
            f"  server ratio {largest:,} / {smallest:,}",
            RATIO,
            ratios(server[largest], server[smallest]),
        )
    )
    return figures


def _schema(level: int) -> str:
    return f"bench_backlog_{level}"


def _fill(ctx: Context, level: int, pending: int) -> Engine:
    """Make the level's schema and table and fill them; return an engine whose connections
    find that table first (``search_path``)."""
    engine = schema_of_its_own(ctx.engine, ctx.services.database_url, _schema(level))
    add_dispatched(engine, level)
    add_pending(engine, pending)
    analyze(engine, vacuum=True)
    return engine


def _claim(conn: Connection, relay: Relay, batch_size: int) -> float:
    """One claim, in a transaction rolled back afterwards; milliseconds."""
    query = relay.claim_query()
    with conn.begin() as transaction:
        start = time.perf_counter()
        rows = conn.execute(query).all()
        elapsed = (time.perf_counter() - start) * 1000
        transaction.rollback()
    if len(rows) != batch_size:
        raise RuntimeError(f"claimed {len(rows)} rows, expected {batch_size}")
    return elapsed


def _server_time(conn: Connection, relay: Relay) -> float:
    """The server's execution time for one claim (EXPLAIN ANALYZE, rolled back); ms."""
    claim = relay.claim_query().compile(conn, compile_kwargs={"literal_binds": True})
    with conn.begin() as transaction:
        [[raw]] = conn.execute(text(f"EXPLAIN (ANALYZE, FORMAT JSON) {claim}")).all()
        transaction.rollback()
    plan = raw if isinstance(raw, list) else json.loads(raw)
    return float(plan[0]["Execution Time"])
