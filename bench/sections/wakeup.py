"""What waking the relay costs concurrent writers: transactions per second under pgbench.

Every INSERT into the outbox fires the ``celery_outbox_notify`` trigger. PostgreSQL
serialises the commits of notifying transactions behind one lock, so a NOTIFY on every
commit caps how fast many writers can commit at once; the trigger therefore notifies only
while a relay waits on LISTEN (``outbox.postgres.wakeups``). Each run is ``pgbench`` committing one
INSERT of a pending outbox row per transaction from concurrent clients, on the bench's own
database, with the trigger as one of:

- ``notify while a relay waits``: the trigger as ``init_db`` made it (the current code):
  its ``WHEN`` reads the count of waiting relays from a sequence;
- ``function reads the listeners``: the design of 2026-12-03, the trigger's function
  reading ``celery_outbox_listeners`` on every INSERT (the alternative it replaced);
- ``notify on every commit``: the first design, ``pg_notify`` unconditionally;
- ``no wake-up``: no trigger, the ceiling the others are compared with.

Twice: with no relay running (writers only: nobody waits, so the current function never
notifies), and with the example's ``flask --app webapp outbox relay`` running, which waits
on LISTEN when idle and stands down while busy. The relay is idle again before each run:
it has published every row of the previous one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sqlalchemy import Connection, text

from bench.children import Child, example_relay, wait_for
from bench.context import Context, rotated
from bench.data import count_status, empty_queue, empty_tables, waiting_listeners
from bench.pgbench import THREADS, Pgbench
from bench.results import RATIO, Figure, Target, ratios

SECTION = "wakeup"
WAITING, EVERY, NONE = "notify while a relay waits", "notify on every commit", "no wake-up"
TABLE = "function reads the listeners"
WRITERS_ONLY, RELAY_RUNNING = "writers only", "relay running"
#: How long the relay may take to publish a run's rows.
DRAIN_TIMEOUT = 300.0

_PLAIN_TRIGGER = (
    "CREATE TRIGGER celery_outbox_notify AFTER INSERT ON celery_outbox"
    " FOR EACH STATEMENT EXECUTE FUNCTION celery_outbox_notify()"
)
_EVERY_COMMIT = """
CREATE OR REPLACE FUNCTION celery_outbox_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('celery_outbox', '');
    RETURN NULL;
END $$
"""
_READ_LISTENERS = """
CREATE OR REPLACE FUNCTION celery_outbox_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT FROM celery_outbox_listeners WHERE waiting) THEN
        PERFORM pg_notify('celery_outbox', '');
    END IF;
    RETURN NULL;
END $$
"""
_TPS = re.compile(r"^tps = ([0-9.]+) \(without initial connection time\)$", re.MULTILINE)
#: pgbench's ``-P 1`` report of one second.
_PROGRESS = re.compile(r"^progress: [0-9.]+ s, ([0-9.]+) tps", re.MULTILINE)
#: Seconds of a run left out of its steady rate: long enough for a relay that nobody wakes
#: to reach its first poll (1 s) and stand down, as a woken one does at once.
SETTLING = 2


def run(ctx: Context) -> list[Figure]:
    # Each transaction: what an enqueue of ``notify_customer(1)`` writes.
    pgbench = Pgbench(ctx, SECTION, args="'[1]'")
    writers = ctx.sizes.wakeup_writers
    seconds = _whole_seconds(ctx.sizes.wakeup_seconds)
    variants = [WAITING, TABLE, EVERY, NONE]
    scenarios = [WRITERS_ONLY, RELAY_RUNNING]
    tps: dict[str, dict[int, dict[str, list[float]]]] = {
        scenario: {count: {variant: [] for variant in variants} for count in writers}
        for scenario in scenarios
    }
    #: With the relay running: the writers' rate once the relay drains in every variant.
    steady: dict[int, dict[str, list[float]]] = {
        count: {variant: [] for variant in variants} for count in writers
    }
    #: With the relay running: the tasks it published per second while pgbench ran.
    published: dict[int, dict[str, list[float]]] = {
        count: {variant: [] for variant in variants} for count in writers
    }
    with ctx.engine.connect() as conn:
        original = _Trigger(
            function=conn.execute(
                text("SELECT pg_get_functiondef('celery_outbox_notify'::regproc)")
            ).scalar_one(),
            trigger=conn.execute(
                text(
                    "SELECT pg_get_triggerdef(oid) FROM pg_trigger"
                    " WHERE tgname = 'celery_outbox_notify'"
                )
            ).scalar_one(),
        )
    try:
        for scenario in scenarios:
            relay = (
                example_relay("relay-wakeup", ctx.services.work_dir, waiting_in=ctx.engine)
                if scenario == RELAY_RUNNING
                else None
            )
            try:
                if relay is None and waiting_listeners(ctx.engine):
                    raise RuntimeError("writers only: a relay still says it waits on LISTEN")
                for run_index in range(ctx.repeats):
                    for count in writers:
                        for variant in rotated(variants, run_index):
                            ctx.say(
                                f"wakeup: run {run_index + 1}/{ctx.repeats}, {scenario}, "
                                f"{count} writers, {variant}"
                            )
                            _set_variant(ctx, variant, original)
                            empty_tables(ctx.engine)
                            empty_queue(ctx.redis)
                            rate, each = _writers(pgbench, count, seconds)
                            tps[scenario][count][variant].append(rate)
                            if relay is not None:
                                # A run too short to settle (--quick) counts whole.
                                after = each[SETTLING:] or [rate]
                                steady[count][variant].append(sum(after) / len(after))
                                sent = count_status(ctx.engine, "dispatched") / seconds
                                published[count][variant].append(sent)
                                _wait_until_idle(ctx, relay)
                            empty_queue(ctx.redis)
            finally:
                if relay is not None:
                    relay.stop()
    finally:
        _restore(ctx, original)
        empty_tables(ctx.engine)
        empty_queue(ctx.redis)
    shape = (
        f"pgbench -n -c {'/'.join(map(str, writers))} -j {THREADS} -T {seconds}: "
        "one INSERT of a pending outbox row per transaction"
    )
    figures: list[Figure] = []
    for scenario in scenarios:
        for count in writers:
            rates = tps[scenario][count]
            label = f"{count} writers, {scenario}"
            for variant in variants:
                figures.append(Figure(SECTION, f"{label}: {variant}", "tx/s", rates[variant]))
            figures.append(
                Figure(
                    SECTION,
                    f"{label}: ratio {WAITING} / {NONE}",
                    RATIO,
                    ratios(rates[WAITING], rates[NONE]),
                    target=Target.at_least(0.9, RATIO),
                )
            )
            figures.extend(
                Figure(
                    SECTION,
                    f"{label}: ratio {variant} / {NONE}",
                    RATIO,
                    ratios(rates[variant], rates[NONE]),
                )
                for variant in (TABLE, EVERY)
            )
            if scenario == RELAY_RUNNING:
                figures.extend(_relay_figures(label, rates, published[count]))
                figures.append(
                    Figure(
                        SECTION,
                        f"{label}, from second {SETTLING + 1}: ratio {WAITING} / {NONE}",
                        RATIO,
                        ratios(steady[count][WAITING], steady[count][NONE]),
                    )
                )
    figures[0].note = shape
    relay_first = next(f for f in figures if RELAY_RUNNING in f.name)
    relay_first.note = "flask outbox relay running, idle (waiting on LISTEN) as each run starts"
    return figures


def _relay_figures(
    label: str, rates: dict[str, list[float]], published: dict[str, list[float]]
) -> list[Figure]:
    """What the relay published meanwhile, and writes plus publishes per second: the relay
    and the writers share the machine's cores, so a variant whose relay publishes more
    leaves the writers less."""
    figures = [
        Figure(SECTION, f"{label}: {variant}, relay published meanwhile", "tasks/s", sent)
        for variant, sent in published.items()
    ]
    both = {
        variant: [w + p for w, p in zip(rates[variant], published[variant], strict=True)]
        for variant in published
    }
    figures.append(
        Figure(
            SECTION,
            f"{label}: ratio of writes + publishes, {WAITING} / {NONE}",
            RATIO,
            ratios(both[WAITING], both[NONE]),
        )
    )
    return figures


def _whole_seconds(seconds: float) -> int:
    """pgbench's ``-T`` takes whole seconds only."""
    return max(1, round(seconds))


@dataclass(frozen=True)
class _Trigger:
    """The wake-up as ``init_db`` made it: its function's and its trigger's definitions."""

    function: str
    trigger: str


def _set_variant(ctx: Context, variant: str, original: _Trigger) -> None:
    with ctx.engine.begin() as conn:
        conn.execute(text("DROP TRIGGER IF EXISTS celery_outbox_notify ON celery_outbox"))
        if variant == WAITING:
            _define(conn, original.function)
            _define(conn, original.trigger)
        elif variant in (TABLE, EVERY):
            _define(conn, _READ_LISTENERS if variant == TABLE else _EVERY_COMMIT)
            _define(conn, _PLAIN_TRIGGER)


def _restore(ctx: Context, original: _Trigger) -> None:
    """The function and trigger as ``init_db`` left them."""
    _set_variant(ctx, WAITING, original)


def _define(conn: Connection, definition: str) -> None:
    # Sent as it is: a function body is no place for bind parameters.
    conn.exec_driver_sql(definition)


def _writers(pgbench: Pgbench, writers: int, seconds: int) -> tuple[float, list[float]]:
    """One pgbench run of ``writers`` clients for ``seconds``: its transactions per second,
    connection set-up excluded, and those of each second."""
    done = pgbench.run(writers, ["-T", str(seconds), "-P", "1"], seconds + 120)
    found = _TPS.search(done.stdout)
    if found is None:
        raise RuntimeError(f"pgbench ({writers} clients) printed no tps line:\n{done.stdout}")
    return float(found.group(1)), [float(rate) for rate in _PROGRESS.findall(done.stderr)]


def _wait_until_idle(ctx: Context, relay: Child) -> None:
    """Until the relay has published every row of the run and waits on LISTEN again."""
    wait_for(
        lambda: count_status(ctx.engine, "pending") == 0 and waiting_listeners(ctx.engine) > 0,
        DRAIN_TIMEOUT,
        "every row published and the relay waiting again",
        relay,
    )
