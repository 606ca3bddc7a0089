"""Probe scaling: how long the outbox's read-mostly probes take beside 0 and 1,000,000
dispatched rows.

The probes:

- ``collect_stats(engine, now)``: the snapshot ``flask outbox status``, ``/healthz``,
  ``/metrics`` and the dashboard read, called with an engine as the first three call it
  (a pooled connection checked out and back in, with its rollback, is part of the time);
- ``latest_dead(engine, limit=20)``: the dashboard's list of dead rows;
- the confirmation pass, ``Relay.confirmation.run_once()``, which a draining relay runs
  every ``MAINTENANCE_INTERVAL``: two settling UPDATEs (each its own transaction, matching
  no row: no deadline has passed), the broker's identity (``RedisProbe.state()``: a fresh
  connection and one pipelined round trip, then the row the relays keep of the broker,
  which matches), the lost-message check (the unconfirmed rows dispatched over
  ``LOST_AFTER`` ago, then the broker's queue and unacknowledged messages read on a fresh
  connection: every one of those rows is found queued, so none is ever presumed lost) and
  the overdue check (none). It changes nothing, so every pass does the same work; each
  one is checked to have changed nothing.

Each level gets its own copy of the outbox's tables, in a schema of its own, and an
engine whose connections set ``search_path`` to it, so the library's own statements run
unchanged against each. Beside the level's history of dispatched rows (confirmed a day
ago; their consumers' records in ``celery_outbox_processed``), every level holds the
same backlog of a busy outbox, relative to one moment ``now``:

- ``PENDING_DUE`` pending rows due within the last minute, and ``PENDING_LATER`` due in
  an hour (a countdown);
- ``DEAD_ROWS`` dead rows, half that failed to publish, half that ran out of deliveries
  and wait for a late confirmation (their deadline an hour ahead);
- ``RECENT_ROWS`` rows dispatched and confirmed within the last minute;
- ``AWAITING_ROWS`` rows awaiting their consumer's confirmation, published for real by a
  relay running on a clock set back 30 s (for half of them) and 5 s (the other half), so
  that their messages wait in a queue of the level's own. The older half are past
  ``LOST_AFTER`` and looked for on the broker; the younger half are not yet.

Every probe reads the clock ``now`` (the relay's is fixed to it), so the backlog looks
the same at every level and at every round however long the run takes. Rows are
inserted server-side, then VACUUM ANALYZE. The levels are timed in turn, round after
round (:func:`bench.timing.in_rounds`).
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import Any

from celery import Celery
from sqlalchemy import Engine, text

from bench.celery_app import result_subscriptions
from bench.context import Context
from bench.data import add_dispatched, analyze, empty_queue, schemas_of_its_own
from bench.results import RATIO, Figure, Target, ratios
from bench.timing import Rounds, in_rounds, timed_ms
from outbox import ConfirmationResult, Relay, collect_stats
from outbox.admin.search import latest_dead
from outbox.clock import utcnow
from outbox.maintenance.confirmation import LOST_AFTER

SECTION = "probes"
STATS, DEAD, CONFIRMATION = "collect_stats", "latest_dead(limit=20)", "confirmation pass"
PROBES = (STATS, DEAD, CONFIRMATION)
#: The backlog every level holds beside its history (see the module docstring).
PENDING_DUE, PENDING_LATER, DEAD_ROWS, RECENT_ROWS, AWAITING_ROWS = 300, 100, 100, 300, 300
#: The example's tasks, which the backlog's rows take in turn.
TASKS = ("orders.notify_customer", "orders.reserve_stock", "orders.prepare_shipment")
#: How long before ``now`` the two halves of the awaiting rows were dispatched: one past
#: ``LOST_AFTER``, one not yet.
AWAITING_AGES = (timedelta(seconds=3 * LOST_AFTER), timedelta(seconds=LOST_AFTER / 2))
#: Dead rows the dashboard lists.
DEAD_LISTED = 20

# Rows of the example's three tasks in turn, relative to the bound ``:now``.
_PENDING = """
INSERT INTO celery_outbox (task_id, task_name, args, kwargs, options, status, attempts,
                           created_at, available_at)
SELECT gen_random_uuid(), (CAST(:tasks AS text[]))[1 + n % 3], jsonb_build_array(n),
       '{}'::jsonb, CAST(:options AS jsonb), 'pending', 0,
       CAST(:now AS timestamptz) - interval '1 minute',
       CAST(:due AS timestamptz) + n * interval '1 ms'
FROM generate_series(1, :rows) AS n
"""

_RECENT = """
INSERT INTO celery_outbox (task_id, task_name, args, kwargs, options, status, attempts,
                           deliveries, created_at, available_at, dispatched_at)
SELECT gen_random_uuid(), (CAST(:tasks AS text[]))[1 + n % 3], jsonb_build_array(n),
       '{}'::jsonb, '{}'::jsonb, 'dispatched', 0, 1,
       CAST(:now AS timestamptz) - interval '2 minutes',
       CAST(:now AS timestamptz) - interval '2 minutes',
       CAST(:now AS timestamptz) - interval '1 minute' + n * interval '100 ms'
FROM generate_series(1, :rows) AS n
"""

# Even rows failed to publish max_attempts times; odd ones were published max_deliveries
# times unconfirmed and wait for a late confirmation until their deadline.
_DEAD = """
INSERT INTO celery_outbox (task_id, task_name, args, kwargs, options, status, attempts,
                           deliveries, last_error, created_at, available_at,
                           dispatched_at, confirm_deadline)
SELECT gen_random_uuid(), (CAST(:tasks AS text[]))[1 + n % 3], jsonb_build_array(n),
       '{}'::jsonb, '{}'::jsonb, 'dead',
       CASE WHEN n % 2 = 0 THEN 10 ELSE 0 END, CASE WHEN n % 2 = 0 THEN 0 ELSE 5 END,
       'bench: dead', CAST(:now AS timestamptz) - n * interval '1 hour',
       CAST(:now AS timestamptz) - n * interval '1 hour',
       CASE WHEN n % 2 = 1 THEN CAST(:now AS timestamptz) - interval '2 hours' END,
       CASE WHEN n % 2 = 1 THEN CAST(:now AS timestamptz) + interval '1 hour' END
FROM generate_series(1, :rows) AS n
"""

_PROCESSED = """
INSERT INTO celery_outbox_processed (task_id, task_name, processed_at)
SELECT CAST(task_id AS text), task_name, dispatched_at
FROM celery_outbox WHERE status = 'dispatched' AND confirm_deadline IS NULL
"""

_TABLES = (
    "celery_outbox",
    "celery_outbox_processed",
    "celery_outbox_brokers",
    "celery_outbox_relays",
)


def run(ctx: Context) -> list[Figure]:
    levels = ctx.sizes.probe_levels
    now = utcnow()
    engines: dict[int, Engine] = {}
    relays: dict[int, Relay] = {}
    try:
        # As in the relay command: no result subscriptions for what the fill publishes.
        with (
            result_subscriptions(False),
            schemas_of_its_own(ctx.engine, ctx.services.database_url) as make,
        ):
            for level in levels:
                ctx.say(f"probes: filling {level:,} dispatched rows beside the backlog")
                engines[level] = _fill(ctx, make(f"bench_probes_{level}"), level, now)
                relays[level] = Relay(engines[level], ctx.celery_app, clock=lambda: now)
                _check(engines[level], now)
            timed = in_rounds(
                ctx,
                SECTION,
                levels,
                ctx.sizes.probe_rounds,
                lambda level: _probe(engines[level], relays[level], now),
            )
    finally:
        for level in levels:
            empty_queue(ctx.redis, _queue(level))
    return _figures(ctx, levels, timed)


def _figures(ctx: Context, levels: tuple[int, ...], timed: Rounds[int]) -> list[Figure]:
    notes = {
        STATS: (
            f"median of {ctx.sizes.probe_rounds} calls per run, as the caller sees it; beside "
            f"{PENDING_DUE + PENDING_LATER} pending, {DEAD_ROWS} dead, "
            f"{RECENT_ROWS + AWAITING_ROWS} dispatched in the last minute"
        ),
        DEAD: "the dashboard's dead rows, newest first",
        CONFIRMATION: (
            f"Relay.confirmation.run_once(): {AWAITING_ROWS} rows awaiting confirmation, "
            f"{AWAITING_ROWS // 2} looked for on the broker and found queued; changes nothing"
        ),
    }
    smallest, largest = levels[0], levels[-1]
    figures: list[Figure] = []
    for probe in PROBES:
        figures.extend(
            Figure(
                SECTION,
                f"{probe} beside {level:,} dispatched",
                "ms",
                timed.medians[probe][level],
                note=notes[probe] if level == smallest else "",
                samples=timed.samples[probe][level],
            )
            for level in levels
        )
        figures.append(
            Figure(
                SECTION,
                f"  {probe}: ratio {largest:,} / {smallest:,} dispatched",
                RATIO,
                ratios(timed.medians[probe][largest], timed.medians[probe][smallest]),
                target=Target.at_most(1.5, RATIO),
            )
        )
    return figures


def _queue(level: int) -> str:
    """The queue the level's awaiting rows were published to."""
    return f"bench.probes.{level}"


def _fill(ctx: Context, engine: Engine, level: int, now: datetime) -> Engine:
    """Fill the level's tables (see the module docstring)."""
    add_dispatched(engine, level)
    due = now - timedelta(minutes=1)
    for age in AWAITING_AGES:
        _insert(
            engine, _PENDING, now, AWAITING_ROWS // 2, due=due, options={"queue": _queue(level)}
        )
        _dispatch(engine, ctx.celery_app, AWAITING_ROWS // 2, at=now - age)
    _insert(engine, _PENDING, now, PENDING_DUE, due=due, options={})
    _insert(engine, _PENDING, now, PENDING_LATER, due=now + timedelta(hours=1), options={})
    _insert(engine, _RECENT, now, RECENT_ROWS)
    _insert(engine, _DEAD, now, DEAD_ROWS)
    with engine.begin() as conn:
        conn.execute(text(_PROCESSED))
    analyze(engine, *_TABLES, vacuum=True)
    return engine


def _insert(engine: Engine, statement: str, now: datetime, rows: int, **params: Any) -> None:
    if "options" in params:
        params["options"] = json.dumps(params["options"])
    with engine.begin() as conn:
        conn.execute(text(statement), {"now": now, "rows": rows, "tasks": list(TASKS), **params})


def _dispatch(engine: Engine, celery_app: Celery, rows: int, at: datetime) -> None:
    """Publish the due pending rows with a relay whose clock says ``at``: they are marked
    dispatched at ``at``, awaiting confirmation, and their messages are queued."""
    published = Relay(engine, celery_app, clock=lambda: at).drain().published
    if published != rows:
        raise RuntimeError(f"published {published} of {rows} awaiting rows")


def _check(engine: Engine, now: datetime) -> None:
    """The backlog is what the module docstring says it is."""
    stats = collect_stats(engine, now)
    found = (stats.pending, stats.due, stats.dead, stats.dispatched_last_minute)
    expected = (PENDING_DUE + PENDING_LATER, PENDING_DUE, DEAD_ROWS, RECENT_ROWS + AWAITING_ROWS)
    if found != expected:
        raise RuntimeError(f"pending, due, dead, dispatched last minute: {found}, not {expected}")


def _probe(engine: Engine, relay: Relay, now: datetime) -> dict[str, float]:
    """One call of each probe, each checked; milliseconds."""
    _, stats_ms = timed_ms(lambda: collect_stats(engine, now))
    dead, dead_ms = timed_ms(lambda: latest_dead(engine, limit=DEAD_LISTED))
    result, confirmation_ms = timed_ms(relay.confirmation.run_once)
    if len(dead) != DEAD_LISTED:
        raise RuntimeError(f"latest_dead listed {len(dead)} rows, not {DEAD_LISTED}")
    if result != ConfirmationResult():
        raise RuntimeError(f"the confirmation pass changed rows: {result}")
    return {STATS: stats_ms, DEAD: dead_ms, CONFIRMATION: confirmation_ms}
