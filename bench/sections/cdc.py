"""The CDC relay beside the polling relay, on one PostgreSQL cluster with
``wal_level = logical``: commit-to-publish latency, throughput and what each costs the
database.

The section starts a cluster of its own (``tests.logical_postgres``, fsync on, with
``pg_stat_statements``), creates the example's tables in a database there, and runs the
example's ``flask --app webapp outbox relay`` as a role of its own, with and without
``--cdc``, taking turns inside each repeat:

- **latency**: enqueues at ``latency_rate`` a second for ``latency_seconds`` from this
  process, each committed alone, and the time from each commit to its message in Redis;
- **database cost** over the same run: the statements the relay's role ran
  (``pg_stat_statements``) and the WAL written, per task, once every row is marked;
- **throughput**: ``cdc_backlog_rows`` rows committed in transactions of 100 while no
  relay runs, then the rate from the first message to the last once one starts.

And the driver: psycopg 2's streaming replication connection against the SQL interface
(``pg_logical_slot_peek_binary_changes`` and ``pg_replication_slot_advance``) that
psycopg 3 can call, each reading ``cdc_driver_commits`` single-row commits one by one:
the time from a commit until its change is in hand and confirmed.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.orm import Session

from bench.children import Child, ChildError, example_relay, wait_for, watching
from bench.context import Context, rotated
from bench.data import empty_queue, empty_tables
from bench.latencies import commit_to_publish
from bench.results import Figure, percentile
from outbox import TaskOutbox
from outbox.postgres.pgoutput import Commit, decode, format_lsn
from outbox.postgres.slot import CdcSlot
from tests.logical_postgres import LogicalCluster, logical_cluster, read_until_commit

SECTION = "cdc"
POLLING, CDC = "polling relay (LISTEN/NOTIFY)", "CDC relay (--cdc)"
STREAMING, SQL = "streaming replication (psycopg 2)", "SQL interface (peek + advance)"
RELAY_ROLE = "outbox_bench_relay"
DATABASE = "outbox_bench_cdc"
#: The relay role's statements over a run, and the WAL written.
_QUERIES = text(
    "SELECT coalesce(sum(calls), 0) FROM pg_stat_statements"
    " WHERE userid = CAST(:role AS regrole)::oid"
).bindparams(role=RELAY_ROLE)
_LSN = text("SELECT pg_current_wal_lsn()")
_WAL_SINCE = text("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), CAST(:since AS pg_lsn))")
_PUBLICATION, _DRIVER_SLOT = "outbox_bench_driver", "outbox_bench_driver"


def run(ctx: Context) -> list[Figure]:
    variants = [POLLING, CDC]
    p50: dict[str, list[float]] = {v: [] for v in variants}
    p99: dict[str, list[float]] = {v: [] for v in variants}
    queries: dict[str, list[float]] = {v: [] for v in variants}
    wal: dict[str, list[float]] = {v: [] for v in variants}
    throughput: dict[str, list[float]] = {v: [] for v in variants}
    driver: dict[str, list[float]] = {STREAMING: [], SQL: []}
    driver_p99: dict[str, list[float]] = {STREAMING: [], SQL: []}
    settings = {"shared_preload_libraries": "'pg_stat_statements'"}
    with (
        logical_cluster(durable=True, settings=settings) as cluster,
        _database(cluster) as (
            engine,
            relay_url,
        ),
    ):
        for run_index in range(ctx.repeats):
            for variant in rotated(variants, run_index):
                ctx.say(f"cdc: run {run_index + 1}/{ctx.repeats}, {variant}: latency")
                measured = _latency(ctx, engine, relay_url, variant)
                p50[variant].append(percentile(measured["latencies"], 50))
                p99[variant].append(percentile(measured["latencies"], 99))
                queries[variant].append(measured["queries_per_task"])
                wal[variant].append(measured["wal_per_task"])
            for variant in rotated(variants, run_index):
                ctx.say(f"cdc: run {run_index + 1}/{ctx.repeats}, {variant}: throughput")
                throughput[variant].append(_throughput(ctx, engine, relay_url, variant))
            for way in rotated([STREAMING, SQL], run_index):
                ctx.say(f"cdc: run {run_index + 1}/{ctx.repeats}, driver: {way}")
                latencies = _driver(ctx, engine, cluster, way)
                driver[way].append(percentile(latencies, 50))
                driver_p99[way].append(percentile(latencies, 99))
    load = (
        f"{ctx.sizes.latency_rate:g} enqueues/s for {ctx.sizes.latency_seconds:g}s, "
        "one commit each; PostgreSQL 15 with wal_level=logical, fsync on"
    )
    figures: list[Figure] = []
    for variant in variants:
        figures += [
            Figure(SECTION, f"{variant}: commit → publish p50", "ms", p50[variant]),
            Figure(SECTION, f"{variant}: commit → publish p99", "ms", p99[variant]),
            Figure(SECTION, f"{variant}: statements per task", "", queries[variant]),
            Figure(SECTION, f"{variant}: WAL bytes per task", "B", wal[variant]),
            Figure(
                SECTION,
                f"{variant}: throughput ({ctx.sizes.cdc_backlog_rows:,} rows)",
                "tasks/s",
                throughput[variant],
            ),
        ]
    figures[0].note = load
    figures += [
        Figure(SECTION, f"driver, {way}: commit → change in hand p50", "ms", driver[way])
        for way in (STREAMING, SQL)
    ]
    figures += [
        Figure(SECTION, f"driver, {way}: p99", "ms", driver_p99[way]) for way in (STREAMING, SQL)
    ]
    figures[-4].note = f"{ctx.sizes.cdc_driver_commits} single-row commits, read one by one"
    return figures


@contextmanager
def _database(cluster: LogicalCluster) -> Iterator[tuple[Engine, str]]:
    """The example's tables in a database of the cluster, and the URL of a role of the
    relays' own (with REPLICATION), so that their statements can be told apart."""
    from webapp import init_db

    with psycopg.connect(cluster.dsn("postgres"), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {DATABASE}")
        conn.execute(f"CREATE ROLE {RELAY_ROLE} LOGIN SUPERUSER")
    engine = create_engine(cluster.url(DATABASE))
    try:
        init_db(engine)
        with engine.begin() as conn:
            conn.execute(text("CREATE EXTENSION pg_stat_statements"))
        yield engine, cluster.url(DATABASE).replace("postgres@", f"{RELAY_ROLE}@")
    finally:
        engine.dispose()


def _start_relay(ctx: Context, relay_url: str, variant: str) -> Child:
    """The relay process, as the relays' role, once it waits for commits (and, with
    --cdc, streams)."""
    kind = "cdc" if variant == CDC else "polling"
    options = ["--cdc"] if variant == CDC else []
    return example_relay(
        f"relay-{kind}", ctx.services.work_dir, *options, env={"DATABASE_URL": relay_url}
    )


def _stop_relay(relay: Child, engine: Engine, variant: str) -> None:
    relay.stop()
    with engine.connect() as conn:
        left = (
            conn.execute(text("SELECT name FROM celery_outbox_relays WHERE kind = 'cdc'"))
            .scalars()
            .all()
        )
    if left:
        # A CDC relay that stops removes its heartbeat, or polling would leave rows
        # alone for cdc_grace after it.
        raise ChildError(f"a stopped relay left CDC heartbeats {left}:\n{relay.log()}")
    if variant == CDC:
        # The next CDC run streams from a new slot: this one would hand it the polling
        # runs' rows as well.
        CdcSlot(engine).drop()


def _latency(ctx: Context, engine: Engine, relay_url: str, variant: str) -> dict[str, Any]:
    count = round(ctx.sizes.latency_rate * ctx.sizes.latency_seconds)
    empty_tables(engine)
    empty_queue(ctx.redis)
    relay = _start_relay(ctx, relay_url, variant)
    since = ""

    def reset() -> None:
        """Once the warm-up's rows are marked: count from here on."""
        nonlocal since
        wait_for(lambda: _pending(engine) == 0, 30, "warm-up rows marked", interval=0.01)
        with engine.begin() as conn:
            conn.execute(text("SELECT pg_stat_statements_reset()"))
            since = str(conn.execute(_LSN).scalar_one())

    try:
        paced = commit_to_publish(
            ctx,
            engine,
            variant,
            watch_seconds=ctx.sizes.latency_seconds + 60,
            warm_up_seconds=30,
            before_go=reset,
        )
        wait_for(lambda: _pending(engine) == 0, 60, "every row marked dispatched", interval=0.01)
        with engine.connect() as conn:
            statements = float(conn.execute(_QUERIES).scalar_one())
            written = float(conn.execute(_WAL_SINCE, {"since": since}).scalar_one())
    finally:
        _stop_relay(relay, engine, variant)
    return {
        "latencies": paced.latencies,
        "queries_per_task": statements / count,
        "wal_per_task": written / count,
    }


def _throughput(ctx: Context, engine: Engine, relay_url: str, variant: str) -> float:
    """Tasks a second from the first message to the last, draining a backlog committed
    while no relay ran (for CDC: after its slot was made)."""
    rows = ctx.sizes.cdc_backlog_rows
    empty_tables(engine)
    empty_queue(ctx.redis)
    if variant == CDC:
        CdcSlot(engine).ensure()
    outbox = TaskOutbox(ctx.celery_app)
    from tasks.orders import notify_customer

    for first in range(0, rows, 100):
        with Session(engine) as session:
            for number in range(first, min(rows, first + 100)):
                outbox.apply_async(notify_customer, args=(number,), session=session)
            session.commit()
    relay = None
    try:
        with watching(ctx.services.work_dir, rows, 600) as watcher:
            watcher.go()
            relay = _start_relay(ctx, relay_url, variant)
            arrivals = watcher.arrivals()
    finally:
        if relay is not None:
            _stop_relay(relay, engine, variant)
        elif variant == CDC:
            CdcSlot(engine).drop()
    if len(arrivals) < rows:
        raise RuntimeError(f"{variant}: {rows - len(arrivals)} of {rows} tasks never arrived")
    times = sorted(arrivals.values())
    return rows / max(times[-1] - times[0], 1e-6)


def _driver(ctx: Context, engine: Engine, cluster: LogicalCluster, way: str) -> list[float]:
    """Milliseconds from each single-row commit until its change is decoded in this
    process and confirmed to the slot, one commit at a time."""
    import psycopg2
    import psycopg2.extras

    commits = ctx.sizes.cdc_driver_commits
    admin = cluster.dsn(DATABASE)
    slot = CdcSlot(engine, slot=_DRIVER_SLOT, publication=_PUBLICATION)
    slot.ensure()
    options = {"proto_version": "1", "publication_names": _PUBLICATION}
    latencies: list[float] = []
    stream: Any = None
    try:
        writer = psycopg.connect(admin, autocommit=True)
        reader = psycopg.connect(admin, autocommit=True)
        if way == STREAMING:
            stream = psycopg2.connect(
                admin, connection_factory=psycopg2.extras.LogicalReplicationConnection
            )
            cursor = stream.cursor()
            cursor.start_replication(slot_name=_DRIVER_SLOT, decode=False, options=options)
        peek = (
            "SELECT lsn, data FROM pg_logical_slot_peek_binary_changes(%s, NULL, NULL,"
            " 'proto_version', '1', 'publication_names', %s)"
        )
        for number in range(commits):
            writer.execute(
                "INSERT INTO celery_outbox (task_id, task_name, args, kwargs, options, status,"
                " attempts, deliveries, created_at, available_at, task_runs) VALUES"
                " (gen_random_uuid(), 'orders.notify_customer', %s, '{}', '{}', 'pending', 0,"
                " 0, now(), now(), 0)",
                (f"[{number}]",),
            )
            committed = time.perf_counter()
            if way == STREAMING:
                _, end = read_until_commit(cursor, timeout=30)
                cursor.send_feedback(flush_lsn=end, force=True)
            else:
                # What a relay woken by the commit's NOTIFY would do: read the changes,
                # then confirm past them.
                while True:
                    rows = reader.execute(peek, (_DRIVER_SLOT, _PUBLICATION)).fetchall()
                    ends = [m.end_lsn for m in (decode(bytes(r[1])) for r in rows)
                            if isinstance(m, Commit)]  # fmt: skip
                    if ends:
                        break
                reader.execute(
                    "SELECT pg_replication_slot_advance(%s, %s::pg_lsn)",
                    (_DRIVER_SLOT, format_lsn(ends[-1])),
                )
            latencies.append((time.perf_counter() - committed) * 1000)
        writer.close()
        reader.close()
    finally:
        if stream is not None:
            stream.close()
        # The walsender outlives the closed stream by a moment: drop() ends it and waits
        # for it to let go of the slot.
        slot.drop()
        empty_tables(engine)
    return latencies


def _pending(engine: Engine) -> int:
    with engine.connect() as conn:
        found: int = conn.execute(
            text("SELECT count(*) FROM celery_outbox WHERE status <> 'dispatched'")
        ).scalar_one()
    return found
