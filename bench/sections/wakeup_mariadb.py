"""What waking the relay costs concurrent writers on MariaDB: transactions per second
under ``mariadb-slap``.

MariaDB has no NOTIFY, so nothing runs at a writer's commit: a relay that waits asks the
database every ``due_check_interval`` (20 ms) whether a row is due, an index-only read of
the first entry of the pending rows' index. What that costs writers is measured here, as
the PostgreSQL table of the ``wakeup`` section is: ``mariadb-slap`` commits one INSERT of
an outbox row per transaction from 4, 16 and 64 clients, on a database of the run's own,

- with ``flask --app webapp outbox relay`` running and waiting (``relay waiting``): the
  rows are due in an hour, so the relay keeps checking and never publishes, as between
  bursts of work;
- with no relay (``no relay``), the ceiling.

A relay that drains while writers write costs them what its publishing takes of the
machine, on any database; that is the ``wakeup`` section's "relay running" scenario.
"""

from __future__ import annotations

import re
import shutil
import subprocess

from sqlalchemy import make_url, text

from bench.children import example_relay
from bench.context import Context, rotated
from bench.environment import due_check_ms, mariadb_database
from bench.results import RATIO, Figure, Target, ratios

SECTION = "wakeup_mariadb"
WAITING, NONE = "relay waiting", "no relay"

#: One writer's transaction: an enqueue of ``notify_customer(1)`` with a countdown of an
#: hour (not due, so the waiting relay's checks find nothing and it keeps waiting).
_QUERY = (
    "INSERT INTO celery_outbox (task_id, task_name, args, kwargs, options, status, "
    "attempts, deliveries, created_at, available_at, task_runs) VALUES "
    "(REPLACE(UUID(), '-', ''), 'orders.notify_customer', '[1]', '{}', '{}', 'pending', "
    "0, 0, UTC_TIMESTAMP(6), UTC_TIMESTAMP(6) + INTERVAL 1 HOUR, 0)"
)
_SECONDS = re.compile(r"Average number of seconds to run all queries: ([0-9.]+) seconds")


def run(ctx: Context) -> list[Figure]:
    slap = shutil.which("mariadb-slap") or shutil.which("mysqlslap")
    if slap is None:
        raise RuntimeError(
            f"the {SECTION} section needs mariadb-slap, from MariaDB's client tools "
            "(e.g. the mariadb-client package)"
        )
    writers = ctx.sizes.wakeup_writers
    queries = ctx.sizes.wakeup_mariadb_queries
    tps: dict[int, dict[str, list[float]]] = {count: {WAITING: [], NONE: []} for count in writers}
    with mariadb_database() as (engine, url):
        options = _client_options(ctx, url)
        for run_index in range(ctx.repeats):
            for count in writers:
                for variant in rotated([WAITING, NONE], run_index):
                    ctx.say(
                        f"{SECTION}: run {run_index + 1}/{ctx.repeats}, {count} writers, {variant}"
                    )
                    with engine.begin() as conn:
                        conn.execute(text("DELETE FROM celery_outbox"))
                    relay = (
                        example_relay(
                            "relay-wakeup-mariadb",
                            ctx.services.work_dir,
                            env={"DATABASE_URL": url},
                        )
                        if variant == WAITING
                        else None
                    )
                    try:
                        rate = _slap(slap, options, count, queries)
                        if relay is not None and not relay.alive:
                            raise RuntimeError(f"the relay exited:\n{relay.log()}")
                    finally:
                        if relay is not None:
                            relay.stop()
                    tps[count][variant].append(rate)
        with engine.begin() as conn:
            conn.execute(text("DELETE FROM celery_outbox"))
    check_ms = due_check_ms()
    shape = (
        f"mariadb-slap --concurrency {'/'.join(map(str, writers))} "
        f"--number-of-queries {queries}: one INSERT of an outbox row per transaction"
    )
    figures: list[Figure] = []
    for count in writers:
        rates = tps[count]
        label = f"MariaDB, {count} writers"
        figures.append(
            Figure(
                SECTION,
                f"{label}: relay waiting (check every {check_ms} ms)",
                "tx/s",
                rates[WAITING],
            )
        )
        figures.append(Figure(SECTION, f"{label}: {NONE}", "tx/s", rates[NONE]))
        figures.append(
            Figure(
                SECTION,
                f"{label}: ratio {WAITING} / {NONE}",
                RATIO,
                ratios(rates[WAITING], rates[NONE]),
                target=Target.at_least(0.9, RATIO),
            )
        )
    figures[0].note = shape
    return figures


def _client_options(ctx: Context, url: str) -> list[str]:
    """The client's connection options, the password in a file of the run's work
    directory rather than on the command line."""
    parsed = make_url(url)
    defaults = ctx.services.work_dir / "wakeup-mariadb.cnf"
    defaults.write_text(f"[client]\npassword={parsed.password}\n")
    defaults.chmod(0o600)
    return [
        f"--defaults-extra-file={defaults}",
        f"--host={parsed.host}",
        f"--port={parsed.port or 3306}",
        f"--user={parsed.username}",
        f"--create-schema={parsed.database}",
    ]


def _slap(slap: str, options: list[str], writers: int, queries: int) -> float:
    """One run of ``writers`` clients committing ``queries`` INSERTs in all: transactions
    per second."""
    args = [
        slap,
        *options,
        f"--concurrency={writers}",
        f"--number-of-queries={queries}",
        "--iterations=1",
        # The schema is the run's database: mariadb-slap must not drop it.
        "--no-drop",
        f"--query={_QUERY}",
    ]
    done = subprocess.run(args, capture_output=True, text=True, timeout=600, check=False)
    found = _SECONDS.search(done.stdout)
    if done.returncode != 0 or found is None or float(found.group(1)) <= 0:
        raise RuntimeError(
            f"mariadb-slap ({writers} clients) exited with {done.returncode}:\n"
            f"{done.stderr[-4000:]}{done.stdout[-2000:]}"
        )
    return queries / float(found.group(1))
