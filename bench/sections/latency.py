"""Commit-to-publish latency at a steady offered load: the relay process vs the beat sweep.

Measured as :mod:`bench.latencies` says, with one of these publishing:

- The relay process is the example's ``flask --app webapp outbox relay``: it LISTENs and
  PostgreSQL's NOTIFY, sent at commit, wakes it.
- The sweep is ``Relay.drain()`` every ``sweep_interval`` seconds in a process of its own,
  which is what the beat-scheduled ``outbox.sweep`` task runs in a worker; the hop from
  beat through the broker to that worker is not included.
- The same relay process with the outbox on MariaDB (a database and user of its own on
  127.0.0.1:3306, made for the run and dropped), which has no NOTIFY: the relay checks
  for a due row every ``due_check_interval`` instead.
"""

from __future__ import annotations

from sqlalchemy import Engine

from bench.children import Child, example_relay, started
from bench.context import Context, rotated
from bench.data import empty_queue, empty_tables
from bench.environment import due_check_ms, mariadb_database
from bench.latencies import Paced, commit_to_publish
from bench.results import Figure, Target, percentile
from outbox import OutboxSettings

SECTION = "latency"
RELAY, SWEEP, MARIADB = "relay", "sweep", "relay on MariaDB"


def run(ctx: Context) -> list[Figure]:
    interval = OutboxSettings().sweep_interval
    variants = [RELAY, SWEEP, MARIADB]
    p50: dict[str, list[float]] = {variant: [] for variant in variants}
    p99: dict[str, list[float]] = {variant: [] for variant in variants}
    samples: dict[str, list[list[float]]] = {variant: [] for variant in variants}
    offered: list[float] = []
    with mariadb_database() as mariadb:
        for run_index in range(ctx.repeats):
            for variant in rotated(variants, run_index):
                ctx.say(f"latency: run {run_index + 1}/{ctx.repeats}, {variant}")
                paced = _measure(ctx, variant, interval, mariadb)
                p50[variant].append(percentile(paced.latencies, 50))
                p99[variant].append(percentile(paced.latencies, 99))
                samples[variant].append(paced.latencies)
                offered.append(paced.rate)
    load = (
        f"{ctx.sizes.latency_rate:g} enqueues/s offered ({min(offered):.0f}-{max(offered):.0f} "
        f"achieved) for {ctx.sizes.latency_seconds:g}s"
    )
    sweep = (
        f"Relay.drain() every {interval:g}s in one process, as the beat-scheduled "
        "outbox.sweep task runs it (beat→worker hop not included)"
    )
    return [
        Figure(
            SECTION,
            "relay process (LISTEN/NOTIFY): p50",
            "ms",
            p50[RELAY],
            target=Target.at_most(5, " ms"),
            note=f"flask outbox relay; {load}",
            samples=samples[RELAY],
        ),
        Figure(SECTION, "relay process: p99", "ms", p99[RELAY], target=Target.at_most(50, " ms")),
        Figure(
            SECTION,
            f"beat sweep every {interval:g}s: p50",
            "ms",
            p50[SWEEP],
            target=Target.at_most(interval * 1000 / 2 + 50, " ms"),
            note=sweep,
            samples=samples[SWEEP],
        ),
        Figure(SECTION, f"beat sweep every {interval:g}s: p99", "ms", p99[SWEEP]),
        Figure(
            SECTION,
            f"relay process on MariaDB (due-row check every {due_check_ms()} ms): p50",
            "ms",
            p50[MARIADB],
            note=f"flask outbox relay, DATABASE_URL=mysql+pymysql://...; {load}",
            samples=samples[MARIADB],
        ),
        Figure(SECTION, "relay process on MariaDB: p99", "ms", p99[MARIADB]),
    ]


def _measure(ctx: Context, variant: str, interval: float, mariadb: tuple[Engine, str]) -> Paced:
    """One run, its publisher started afresh on an empty outbox and queue."""
    engine = mariadb[0] if variant == MARIADB else ctx.engine
    empty_tables(engine)
    empty_queue(ctx.redis)
    work_dir = ctx.services.work_dir
    publisher: Child
    if variant == RELAY:
        publisher = example_relay("relay-loop", work_dir, waiting_in=ctx.engine)
    elif variant == MARIADB:
        publisher = example_relay("relay-mariadb", work_dir, env={"DATABASE_URL": mariadb[1]})
    else:
        publisher = Child.bench("sweep", work_dir, "sweep", "--interval", str(interval))
    with started(publisher):
        if variant == SWEEP:
            publisher.expect("ready")
        return commit_to_publish(
            ctx,
            engine,
            variant,
            watch_seconds=ctx.sizes.latency_seconds + 2 * interval + 30,
            warm_up_seconds=interval + 30,
        )
