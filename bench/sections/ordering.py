"""Per-key ordering: what ordering keys cost the claim, and the end-to-end rate with them.

**Claim cost.** The time to claim one batch (:mod:`bench.claims`, as in the backlog
section) from two tables of the same size, each in a schema of its own:

- *keyed*: ``ordering_keys`` keys with ``ordering_rows_per_key`` rows each (10,000 keys of
  100, 1,000,000 rows): per key, seq 1 is pending, due and holds the key, seqs 2 and up
  are held; ``celery_outbox_keys`` has the keys' rows to match (``last_seq`` the last
  seq, ``head_seq`` 1). The rows go in as a mixed load enqueues them: every key's first
  task, then every key's second, and so on.
- *unkeyed*: as many rows without a key, of which as many are pending and due as the
  keyed table has keys (10,000), and the rest (990,000) dispatched.

Both tables then hold the same number of rows, and the same number the claim can take,
every other row outside the claim's partial index: what differs is only what ordering
adds, the held rows behind the keys (in indexes of their own) and a key and a seq on
each claimed row. A million unkeyed pending rows would instead compare with a claim index
a hundred times the size, a backlog of due work rather than the cost of keys. Rows are
inserted server-side with the table's indexes built afterwards (much faster than through
them), then VACUUM ANALYZE.

**End to end.** ``ordering_e2e_rows`` rows of ``bench.count`` (:mod:`bench.celery_app`)
through one relay to two ``-P solo`` workers, without a key and over
``ordering_e2e_keys`` keys (the rows dealt round the keys, so each key has as many
tasks), runs in turn in a rotated order. The rate is rows over the time from the rows'
commit (one INSERT, with the keys' rows for the keyed run) until the last task has
counted itself done. The relay is a :class:`~outbox.relays.loop.RelayLoop` in a process
of its own (``python -m bench.child loop``: what ``flask outbox relay`` runs, with
``bench.count`` registered): a key's next task becomes pending only when the one before
it has finished, and the NOTIFY of that hand-over wakes the relay. The workers and the
relay stay up for the whole section.

``bench.count`` is not an idempotent consumer: the workers' lifecycle tracking (on in
the example's configuration, connected at ``worker_init`` by ``tasks.application``)
hands each key on when its task's run ends, one transaction on the worker's path.
Beside the rates: the median time from a keyed task's end to the next task of its key
published (the hand-over and the relay's wake-up, claim and publish: with the task's run
and its wait in the queue, one round of a key), and the CPU time per task of the relay
process and of the workers (``/proc``): on two cores, where the keyed run's extra work
goes. Every keyed run is checked afterwards: all its rows ran, no key still has a task
holding it, and no task of a key started before the one ahead of it had finished.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, text

from bench.celery_app import COUNT_TASK, expect_finished, last_finished
from bench.children import Child, celery_workers, monotonic
from bench.claims import CLAIM, SERVER, time_claims
from bench.context import Context, rotated
from bench.data import add_dispatched, add_pending, analyze, empty_queue, schemas_of_its_own
from bench.results import RATIO, Figure, Target, ratios
from outbox import OutboxSettings, Relay

SECTION = "ordering"
KEYED, UNKEYED = "keyed", "unkeyed"
QUEUE = "bench.ordering"
#: The warm-up runs' rows, and the keys of the keyed one.
WARMUP_ROWS, WARMUP_KEYS = 100, 10
#: The task the claim tables' rows are of (never published).
CLAIM_TASK = "orders.notify_customer"

# Rows dealt round the keys, in one pass: row n (from 1) is task seq of key k, with
# n = (seq - 1) * keys + k, due in that order. Each key's first task is pending and holds
# the key; the ones behind it are held.
_KEYED = """
INSERT INTO celery_outbox (task_id, task_name, args, kwargs, options, status, attempts,
                           created_at, available_at, ordering_key, ordering_seq)
SELECT gen_random_uuid(), :task_name, jsonb_build_array(n), '{}'::jsonb,
       CAST(:options AS jsonb), CASE WHEN seq = 1 THEN 'pending' ELSE 'held' END, 0,
       now() - interval '1 minute', now() - interval '1 minute' + n * interval '1 microsecond',
       'order:' || k, seq
FROM generate_series(1, CAST(:keys AS bigint) * CAST(:per_key AS bigint)) AS n,
     LATERAL (SELECT (n - 1) / CAST(:keys AS bigint) + 1 AS seq,
                     (n - 1) % CAST(:keys AS bigint) + 1 AS k) AS place
"""
_KEYS = """
INSERT INTO celery_outbox_keys (key, last_seq, head_seq, head_since, updated_at)
SELECT 'order:' || k, :per_key, 1, now() - interval '1 minute', now() - interval '1 minute'
FROM generate_series(1, :keys) AS k
"""


def run(ctx: Context) -> list[Figure]:
    return [*_claim_cost(ctx), *_end_to_end(ctx)]


# -- claim cost -----------------------------------------------------------------------


def _claim_cost(ctx: Context) -> list[Figure]:
    settings = OutboxSettings()
    relay = Relay(ctx.engine, ctx.celery_app, settings)
    keys, per_key = ctx.sizes.ordering_keys, ctx.sizes.ordering_rows_per_key
    if keys < settings.batch_size:
        raise ValueError(f"ordering_keys={keys} must fill a batch of {settings.batch_size}")
    with schemas_of_its_own(ctx.engine, ctx.services.database_url) as make:
        ctx.say(f"ordering: filling {keys:,} keys of {per_key} rows, and as many unkeyed rows")
        tables = {
            KEYED: _fill_keyed_table(make(f"bench_ordering_{KEYED}"), keys, per_key),
            UNKEYED: _fill_unkeyed_table(make(f"bench_ordering_{UNKEYED}"), keys, per_key),
        }
        _check_claims(tables[KEYED], relay)
        timed = time_claims(ctx, "ordering: claims", tables, relay, settings.batch_size)
    claims, server = timed.medians[CLAIM], timed.medians[SERVER]
    total = keys * per_key
    batch = settings.batch_size
    return [
        Figure(
            SECTION,
            f"claim {batch} rows, keyed: {keys:,} keys of {per_key} rows",
            "ms",
            claims[KEYED],
            note=f"per key 1 pending holding it, {per_key - 1} held; median of "
            f"{ctx.sizes.claim_rounds} claims per run, as the relay sees them",
            samples=timed.samples[CLAIM][KEYED],
        ),
        Figure(
            SECTION,
            f"claim {batch} rows, unkeyed: {total:,} rows",
            "ms",
            claims[UNKEYED],
            note=f"{keys:,} pending due, {total - keys:,} dispatched",
            samples=timed.samples[CLAIM][UNKEYED],
        ),
        Figure(
            SECTION,
            "ratio keyed / unkeyed claim",
            RATIO,
            ratios(claims[KEYED], claims[UNKEYED]),
            target=Target.at_most(1.5, RATIO),
        ),
        Figure(
            SECTION,
            "  server execution, keyed",
            "ms",
            server[KEYED],
            note="EXPLAIN ANALYZE execution time",
        ),
        Figure(SECTION, "  server execution, unkeyed", "ms", server[UNKEYED]),
    ]


def _fill_keyed_table(engine: Engine, keys: int, per_key: int) -> Engine:
    with _indexes_built_after(engine), engine.begin() as conn:
        _insert_keyed(conn, keys, per_key, CLAIM_TASK)
    analyze(engine, "celery_outbox", "celery_outbox_keys", vacuum=True)
    return engine


def _fill_unkeyed_table(engine: Engine, keys: int, per_key: int) -> Engine:
    """As many rows as the keyed table, as many of them claimable as it has keys."""
    with _indexes_built_after(engine):
        add_dispatched(engine, keys * (per_key - 1), CLAIM_TASK)
        add_pending(engine, keys, CLAIM_TASK, analyze_after=False)
    analyze(engine, "celery_outbox", "celery_outbox_keys", vacuum=True)
    return engine


@contextmanager
def _indexes_built_after(engine: Engine) -> Iterator[None]:
    """Fill the outbox table without its indexes (its primary key and unique task id
    included), then build them: a million rows go in several times faster than through
    indexes updated row by row (the random task ids above all). Both tables are filled
    so, and end with the same indexes as created."""
    with engine.begin() as conn:
        constraints = conn.execute(
            text(
                "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint "
                "WHERE conrelid = 'celery_outbox'::regclass AND contype IN ('p', 'u')"
            )
        ).all()
        indexes = conn.execute(
            text(
                "SELECT indexname, indexdef FROM pg_indexes "
                "WHERE schemaname = current_schema() AND tablename = 'celery_outbox' "
                "AND indexname NOT IN (SELECT conname FROM pg_constraint "
                "WHERE conrelid = 'celery_outbox'::regclass)"
            )
        ).all()
        for name, _ in constraints:
            conn.execute(text(f"ALTER TABLE celery_outbox DROP CONSTRAINT {name}"))
        for name, _ in indexes:
            conn.execute(text(f"DROP INDEX {name}"))
    yield
    with engine.begin() as conn:
        conn.execute(text("SET LOCAL maintenance_work_mem = '256MB'"))
        for name, definition in constraints:
            conn.execute(text(f"ALTER TABLE celery_outbox ADD CONSTRAINT {name} {definition}"))
        for _, definition in indexes:
            conn.execute(text(definition))


def _insert_keyed(
    conn: Connection, keys: int, per_key: int, task: str, options: dict[str, Any] | None = None
) -> None:
    """``keys`` keys with ``per_key`` tasks each, and the keys' rows, in ``conn``'s
    transaction (one INSERT each, as many enqueues committed together would write)."""
    values = {"keys": keys, "per_key": per_key}
    conn.execute(text(_KEYS), values)
    conn.execute(text(_KEYED), {**values, "task_name": task, "options": json.dumps(options or {})})


def _check_claims(engine: Engine, relay: Relay) -> None:
    """The keyed table's claim takes the tasks holding their keys, and nothing else."""
    with engine.connect() as conn, conn.begin() as transaction:
        rows = conn.execute(relay.claim_query()).all()
        transaction.rollback()
    if not rows or any(row.ordering_key is None or row.ordering_seq != 1 for row in rows):
        raise RuntimeError("the keyed table's claim took rows that do not hold their key")


# -- end to end -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one end-to-end run measured."""

    #: Rows over the time from their commit to the last task's end (tasks/s).
    rate: float
    #: CPU time (user and system) per task over the run, of the relay process and of the
    #: two workers together (ms).
    relay_cpu: float
    workers_cpu: float
    #: Keyed runs: the median time from a task's end to its key's next task published.
    hand_over: float | None = None


def _end_to_end(ctx: Context) -> list[Figure]:
    _check_tracking()
    rows, keys = ctx.sizes.ordering_e2e_rows, ctx.sizes.ordering_e2e_keys
    if rows % keys:
        raise ValueError(f"ordering_e2e_rows={rows} must be a multiple of the {keys} keys")
    pid = os.getpid()
    relay = Child.bench("ordering-relay", ctx.services.work_dir, "loop")
    outcomes: dict[str, list[Outcome]] = {KEYED: [], UNKEYED: []}
    workers: list[Child] = []
    try:
        workers = celery_workers(
            ctx.services.work_dir,
            ctx.celery_app,
            [
                (f"ordering-worker-{index}", f"bench-ordering-{name}-{pid}@localhost", QUEUE)
                for index, name in enumerate("ab")
            ],
        )
        relay.expect("ready")
        _once(ctx, relay, workers, WARMUP_ROWS, None)
        _once(ctx, relay, workers, WARMUP_ROWS, WARMUP_KEYS)
        for run_index in range(ctx.repeats):
            for variant in rotated([UNKEYED, KEYED], run_index):
                ctx.say(f"ordering: run {run_index + 1}/{ctx.repeats}, {variant}, {rows:,} rows")
                over = keys if variant == KEYED else None
                outcomes[variant].append(_once(ctx, relay, workers, rows, over))
    finally:
        relay.stop()
        for worker in workers:
            worker.stop()
    keyed, unkeyed = outcomes[KEYED], outcomes[UNKEYED]
    return [
        Figure(
            SECTION,
            "commit → finished, unkeyed, 2 workers",
            "tasks/s",
            [outcome.rate for outcome in unkeyed],
            note=f"{rows:,} rows of bench.count, one relay process, 2 -P solo workers",
        ),
        Figure(
            SECTION,
            f"commit → finished, {keys} keys of {rows // keys} tasks, 2 workers",
            "tasks/s",
            [outcome.rate for outcome in keyed],
            note="per-key serialisation bounds a key's rate: its tasks run one at a time",
        ),
        Figure(
            SECTION,
            "ratio keyed / unkeyed end to end",
            RATIO,
            ratios([o.rate for o in keyed], [o.rate for o in unkeyed]),
        ),
        Figure(
            SECTION,
            "  keyed: a task's end → its key's next published",
            "ms",
            [outcome.hand_over or math.nan for outcome in keyed],
            note="median; the worker's hand-over, then the relay woken by its NOTIFY",
        ),
        Figure(
            SECTION,
            "  relay's CPU per task, unkeyed",
            "ms",
            [outcome.relay_cpu for outcome in unkeyed],
            note="user + system time over the run (the machine has 2 cores)",
        ),
        Figure(SECTION, "  relay's CPU per task, keyed", "ms", [o.relay_cpu for o in keyed]),
        Figure(SECTION, "  workers' CPU per task, unkeyed", "ms", [o.workers_cpu for o in unkeyed]),
        Figure(SECTION, "  workers' CPU per task, keyed", "ms", [o.workers_cpu for o in keyed]),
    ]


def _check_tracking() -> None:
    """A keyed task of ``bench.count`` goes on only through the workers' lifecycle
    tracking: without it the first task of each key would hold it for ever."""
    from webapp import config

    if not OutboxSettings.from_mapping(config.outbox_settings()).track_lifecycle:
        raise RuntimeError(
            "the ordering section needs lifecycle tracking in the workers "
            "(OUTBOX_TRACK_LIFECYCLE is off): bench.count is not an idempotent consumer, "
            "so nothing else would hand its keys on"
        )


def _once(ctx: Context, relay: Child, workers: list[Child], rows: int, keys: int | None) -> Outcome:
    """One run, without a key or over ``keys``."""
    with ctx.engine.begin() as conn:
        conn.execute(text("TRUNCATE celery_outbox, celery_outbox_keys"))
    empty_queue(ctx.redis, QUEUE)
    expect_finished(ctx.redis, rows)
    relay_cpu, workers_cpu = _cpu_seconds(relay), sum(map(_cpu_seconds, workers))
    options = {"queue": QUEUE}
    if keys is None:
        add_pending(ctx.engine, rows, COUNT_TASK, options, analyze_after=False)
    else:
        with ctx.engine.begin() as conn:
            _insert_keyed(conn, keys, rows // keys, COUNT_TASK, options)
    committed = monotonic()
    finished_at = last_finished(ctx.redis, rows, 120 + rows / 50, lambda: _where(ctx.engine))
    relay_cpu = _cpu_seconds(relay) - relay_cpu
    workers_cpu = sum(map(_cpu_seconds, workers)) - workers_cpu
    _check_run(ctx.engine, rows, keyed=keys is not None)
    return Outcome(
        rate=rows / (finished_at - committed),
        relay_cpu=relay_cpu * 1000 / rows,
        workers_cpu=workers_cpu * 1000 / rows,
        hand_over=_hand_over_ms(ctx.engine) if keys is not None else None,
    )


def _cpu_seconds(child: Child) -> float:
    """The CPU time (user and system) the child's process has used so far (``-P solo``
    workers and the relay are one process each)."""
    stat = Path(f"/proc/{child.popen.pid}/stat").read_text()
    # Fields after the command's closing parenthesis; utime and stime are the 14th and
    # 15th of the line, in clock ticks.
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _hand_over_ms(engine: Engine) -> float:
    """The median time from a keyed task's end (as its worker recorded it, before the
    hand-over) to the next task of its key published (``dispatched_at``, the relay's
    clock after the publish), in ms."""
    with engine.connect() as conn:
        value = conn.execute(
            text(
                "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM "
                "later.dispatched_at - earlier.task_finished_at)) "
                "FROM celery_outbox AS earlier JOIN celery_outbox AS later "
                "ON later.ordering_key = earlier.ordering_key "
                "AND later.ordering_seq = earlier.ordering_seq + 1"
            )
        ).scalar_one()
    return math.nan if value is None else float(value) * 1000


def _where(engine: Engine) -> str:
    """The rows by status, and the keys still held: what a stalled run left."""
    with engine.connect() as conn:
        statuses = conn.execute(
            text("SELECT status, count(*) FROM celery_outbox GROUP BY status ORDER BY status")
        ).all()
        busy = conn.execute(
            text("SELECT count(*) FROM celery_outbox_keys WHERE head_seq IS NOT NULL")
        ).scalar_one()
    rows = ", ".join(f"{count} {status}" for status, count in statuses)
    return f"rows: {rows or 'none'}; keys with a task holding them: {busy}"


def _check_run(engine: Engine, rows: int, *, keyed: bool, timeout: float = 30) -> None:
    """Every row was published and its run recorded (the workers write their records
    every 0.25 s); for a keyed run, every key handed on to the end, and each task of a
    key started only after the one before it had finished."""
    recorded = text(
        "SELECT count(*) FROM celery_outbox WHERE status = 'dispatched' "
        "AND task_state = 'SUCCESS' AND task_finished_at IS NOT NULL"
    )
    busy = text("SELECT count(*) FROM celery_outbox_keys WHERE head_seq IS NOT NULL")
    deadline = time.monotonic() + timeout
    while True:
        with engine.connect() as conn:
            done = conn.execute(recorded).scalar_one()
            holding = conn.execute(busy).scalar_one() if keyed else 0
        if done == rows and not holding:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"{done} of {rows} runs recorded as finished, {holding} key(s) still held "
                f"{timeout:g}s after the last task ({_where(engine)})"
            )
        time.sleep(0.1)
    if not keyed:
        return
    overlapping = text(
        "SELECT count(*) FROM celery_outbox AS earlier JOIN celery_outbox AS later "
        "ON later.ordering_key = earlier.ordering_key "
        "AND later.ordering_seq = earlier.ordering_seq + 1 "
        "WHERE later.task_started_at < earlier.task_finished_at"
    )
    with engine.connect() as conn:
        found = conn.execute(overlapping).scalar_one()
    if found:
        raise RuntimeError(f"{found} keyed task(s) started before the one before had finished")
