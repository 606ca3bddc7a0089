"""Commit-to-publish latency at a steady offered load: the relay process vs the beat sweep.

The benchmark process enqueues at a fixed rate, each task in its own committed
transaction through :class:`outbox.TaskOutbox` and an ORM session (the app's code path),
and notes the time right after COMMIT returns. A watcher process pops the raw messages
off the Redis queue as they land and notes when each task id arrived. Latency is arrival
minus commit, on the machine-wide monotonic clock.

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

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, create_engine, text
from sqlalchemy.orm import Session

from bench.children import Child, ChildError, monotonic
from bench.context import Context, rotated
from bench.data import empty_queue, empty_tables, queue_length
from bench.results import Figure, Target, percentile
from outbox import OutboxSettings, TaskOutbox
from tests.mariadb import create_database, drop_database

SECTION = "latency"
RELAY, SWEEP, MARIADB = "relay", "sweep", "relay on MariaDB"
#: Tasks sent through before measuring.
WARMUP_TASKS = 5


def run(ctx: Context) -> list[Figure]:
    interval = OutboxSettings().sweep_interval
    variants = [RELAY, SWEEP, MARIADB]
    p50: dict[str, list[float]] = {variant: [] for variant in variants}
    p99: dict[str, list[float]] = {variant: [] for variant in variants}
    samples: dict[str, list[list[float]]] = {variant: [] for variant in variants}
    offered: list[float] = []
    with mariadb_database(ctx) as mariadb:
        for run_index in range(ctx.repeats):
            for variant in rotated(variants, run_index):
                ctx.say(f"latency: run {run_index + 1}/{ctx.repeats}, {variant}")
                latencies, rate = _measure(ctx, variant, interval, mariadb)
                p50[variant].append(percentile(latencies, 50))
                p99[variant].append(percentile(latencies, 99))
                samples[variant].append(latencies)
                offered.append(rate)
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
            f"relay process on MariaDB (due-row check every {_check_ms()} ms): p50",
            "ms",
            p50[MARIADB],
            note=f"flask outbox relay, DATABASE_URL=mysql+pymysql://...; {load}",
            samples=samples[MARIADB],
        ),
        Figure(SECTION, "relay process on MariaDB: p99", "ms", p99[MARIADB]),
    ]


def _check_ms() -> str:
    from outbox.data.mysql import MySQLStore

    return f"{(MySQLStore.due_check_interval or 0) * 1000:g}"


@contextmanager
def mariadb_database(ctx: Context) -> Iterator[tuple[Engine, str]]:
    """This run's MariaDB database with the example's tables: its engine and URL."""
    from webapp import init_db
    from webapp.config import engine_options

    name = f"outbox_bench_{os.getpid()}"
    url = create_database(name)
    engine = create_engine(url, **engine_options(url))
    try:
        init_db(engine)
        yield engine, url
    finally:
        engine.dispose()
        drop_database(name)


def _measure(
    ctx: Context, variant: str, interval: float, mariadb: tuple[Engine, str]
) -> tuple[list[float], float]:
    """One run: start the publisher and the watcher, offer the load, collect latencies (ms)
    and the enqueue rate achieved."""
    from tasks.orders import notify_customer

    sizes = ctx.sizes
    count = round(sizes.latency_rate * sizes.latency_seconds)
    engine = mariadb[0] if variant == MARIADB else ctx.engine
    empty_tables(engine)
    empty_queue(ctx.redis)
    work_dir = ctx.services.work_dir
    if variant in (RELAY, MARIADB):
        publisher = Child(
            "relay-loop",
            [sys.executable, "-m", "flask", "--app", "webapp", "outbox", "relay"],
            work_dir,
            env={"DATABASE_URL": mariadb[1]} if variant == MARIADB else None,
        )
    else:
        publisher = Child.bench("sweep", work_dir, "sweep", "--interval", str(interval))
    wait_seconds = sizes.latency_seconds + 2 * interval + 30
    watcher = Child.bench(
        "watch", work_dir, "watch", "--count", str(count), "--seconds", str(wait_seconds)
    )
    try:
        if variant == RELAY:
            _wait_until_listening(ctx, publisher)
        elif variant == MARIADB:
            wait_until_ready(publisher)
        else:
            publisher.expect("ready")
        watcher.expect("ready")
        outbox = TaskOutbox(ctx.celery_app)
        warm_up(ctx, engine, outbox, notify_customer, timeout=interval + 30)
        watcher.send("go")
        start = monotonic()
        commits = paced_enqueues(engine, outbox, notify_customer, count, sizes.latency_rate)
        achieved = count / (monotonic() - start)
        arrivals: dict[str, float] = watcher.result(wait_seconds + 10)["arrivals"]
        watcher.wait(10)
    finally:
        watcher.stop()
        publisher.stop()
    missing = set(commits) - set(arrivals)
    if missing:
        raise RuntimeError(f"{variant}: {len(missing)} of {count} tasks never reached the queue")
    return [(arrivals[task_id] - committed) * 1000 for task_id, committed in commits.items()], (
        achieved
    )


def paced_enqueues(
    engine: Engine, outbox: TaskOutbox, task: Any, count: int, rate: float
) -> dict[str, float]:
    """``count`` enqueues of ``task`` at ``rate`` a second, each committed alone: when
    each task id committed (``monotonic``)."""
    commits: dict[str, float] = {}
    start = monotonic() + 0.05
    for number in range(count):
        pause = start + number / rate - monotonic()
        if pause > 0:
            time.sleep(pause)
        with Session(engine) as session:
            task_id = outbox.apply_async(task, args=(number,), session=session).id
            session.commit()
            commits[task_id] = monotonic()
    return commits


def warm_up(ctx: Context, engine: Engine, outbox: TaskOutbox, task: Any, timeout: float) -> None:
    """Send a few tasks through first and wait for them: the publisher's first publish
    connects to Redis and declares the queue, which is start-up, not latency."""
    for number in range(WARMUP_TASKS):
        with Session(engine) as session:
            outbox.apply_async(task, args=(number,), session=session)
            session.commit()
    deadline = time.monotonic() + timeout
    while queue_length(ctx.redis) < WARMUP_TASKS:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the warm-up tasks were not published within {timeout:g}s")
        time.sleep(0.01)
    empty_queue(ctx.redis)


def wait_until_ready(relay: Child, timeout: float = 60) -> None:
    """The relay says it is ready once it has drained and waits: from then on its checks
    see every commit."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not relay.alive:
            raise ChildError(f"the relay exited at start-up:\n{relay.log()}")
        if "relay: ready" in relay.log():
            return
        time.sleep(0.05)
    raise ChildError(f"the relay was not ready within {timeout:g}s:\n{relay.log()}")


def _wait_until_listening(ctx: Context, relay: Child, timeout: float = 60) -> None:
    """The relay says in ``celery_outbox_listeners`` that it waits once it has drained and
    LISTENs: from then on every commit notifies it."""
    deadline = time.monotonic() + timeout
    query = text("SELECT count(*) FROM celery_outbox_listeners WHERE waiting")
    while time.monotonic() < deadline:
        if not relay.alive:
            raise ChildError(f"the relay exited at start-up:\n{relay.log()}")
        with ctx.engine.connect() as conn:
            if conn.execute(query).scalar_one():
                return
        time.sleep(0.05)
    raise ChildError(f"the relay did not wait on LISTEN within {timeout:g}s:\n{relay.log()}")
