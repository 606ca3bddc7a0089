"""Every probe reads through indexes beside a million dispatched rows: the plans prove it.

The claim, the stats behind ``flask outbox status``, ``/healthz``, ``/metrics`` and the
dashboard, the confirmation checks, the ordering keys' maintenance and the retention
purge each run their statements against a table of a million dispatched rows (the
history a week of retention keeps) next to a realistic backlog: among it thousands of
ordering keys with a hundred tasks each waiting in line, and many more keys now idle.
Every statement they send is captured and EXPLAINed with
its own parameters (ANALYZE, in a transaction that is rolled back): no plan may scan the
outbox table, and none may read more than ``MAX_BUFFERS`` pages (plus a few dozen per row
it changes), where a scan reads tens of thousands.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from celery import Celery
from flask import Flask
from sqlalchemy import Connection, Engine, text

from outbox import OutboxSettings, Relay, collect_stats
from outbox.admin.search import latest_dead
from outbox.data import store_for
from outbox.data.schema import keys_table
from outbox.maintenance.retention import purge_outbox
from outbox.ordering.handover import Place, finish
from tests.plans import sent_by

#: PostgreSQL's plans (EXPLAIN ANALYZE BUFFERS); MariaDB's are in test_mariadb_plans.
pytestmark = pytest.mark.postgresql

DISPATCHED = 1_000_000
#: The worst a probe may read: a few index pages and the heap pages of the rows it returns.
MAX_BUFFERS = 1_000
#: What changing one row may add: its heap page and the pages of each of its indexes.
BUFFERS_PER_ROW_CHANGED = 40

# Dispatched rows became due and were dispatched long ago; a few hundred in the last
# minute. Pending rows wait (some not yet due), a few are dead, and some dispatched rows
# still wait for their consumer's confirmation (a few of them overdue).
FILL = """
INSERT INTO celery_outbox (task_id, task_name, args, kwargs, options, status, attempts,
                           deliveries, created_at, available_at, dispatched_at,
                           confirm_deadline)
SELECT gen_random_uuid(), 'orders.notify_customer', '[1]'::jsonb, '{}'::jsonb, '{}'::jsonb,
       'dispatched', 0, 1,
       now() - interval '2 days', now() - interval '2 days' + n * interval '1 ms',
       CASE WHEN n > :dispatched - 300 THEN now() - interval '10 seconds'
            ELSE now() - interval '1 day' END,
       CASE WHEN n > :dispatched - 250 THEN now() + interval '1 hour'
            WHEN n > :dispatched - 300 THEN now() - interval '1 minute' END
FROM generate_series(1, :dispatched) AS n
UNION ALL
SELECT gen_random_uuid(), 'orders.reserve_stock', '[2]'::jsonb, '{}'::jsonb, '{}'::jsonb,
       'pending', 0, 0,
       now() - interval '1 minute', now() + (n - 400) * interval '1 second',
       NULL::timestamptz, NULL::timestamptz
FROM generate_series(1, 500) AS n
UNION ALL
SELECT gen_random_uuid(), 'billing.charge_card', '[3]'::jsonb, '{}'::jsonb, '{}'::jsonb,
       'dead', 10, 0,
       now() - interval '3 days', now() - interval '3 days', NULL::timestamptz,
       NULL::timestamptz
FROM generate_series(1, 100) AS n
"""

#: Ordering keys with tasks in line, tasks per key, and keys whose tasks all finished.
BUSY_KEYS = 2_000
PER_KEY = 100
IDLE_KEYS = 100_000
# Each busy key's first task holds it: published ten minutes ago for even keys, pending
# for odd ones; the other 99 are held behind it.
FILL_KEYED = """
INSERT INTO celery_outbox (task_id, task_name, args, kwargs, options, status, attempts,
                           deliveries, created_at, available_at, dispatched_at,
                           ordering_key, ordering_seq)
SELECT gen_random_uuid(), 'orders.notify_customer', '[4]'::jsonb, '{}'::jsonb,
       '{}'::jsonb,
       CASE WHEN s > 1 THEN 'held' WHEN k % 2 = 0 THEN 'dispatched' ELSE 'pending' END,
       0, CASE WHEN s = 1 AND k % 2 = 0 THEN 1 ELSE 0 END,
       now() - interval '1 hour', now() - interval '1 hour' + s * interval '1 ms',
       CASE WHEN s = 1 AND k % 2 = 0 THEN now() - interval '10 minutes' END,
       'order:' || k, s
FROM generate_series(1, :keys) AS k, generate_series(1, :per_key) AS s
"""
FILL_KEYS = """
INSERT INTO celery_outbox_keys (key, last_seq, head_seq, head_since, updated_at)
SELECT 'order:' || k, :per_key, 1, now() - interval '1 hour', now()
FROM generate_series(1, :keys) AS k
UNION ALL
SELECT 'idle:' || k, 3, NULL, NULL, now() - interval '1 day'
FROM generate_series(1, :idle) AS k
"""
#: The tables a probe may not scan.
OUTBOX_TABLES = ("celery_outbox", "celery_outbox_keys")


@pytest.fixture(scope="module")
def million(engine: Engine) -> Iterator[None]:
    truncate = text("TRUNCATE celery_outbox, celery_outbox_processed, celery_outbox_keys")
    keyed = {"keys": BUSY_KEYS, "per_key": PER_KEY, "idle": IDLE_KEYS}
    with engine.begin() as conn:
        conn.execute(truncate)
        conn.execute(text(FILL), {"dispatched": DISPATCHED})
        conn.execute(text(FILL_KEYED), keyed)
        conn.execute(text(FILL_KEYS), keyed)
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE celery_outbox"))
        conn.execute(text("VACUUM ANALYZE celery_outbox_keys"))
    yield
    with engine.begin() as conn:
        conn.execute(truncate)


@pytest.fixture(autouse=True)
def _each_test_starts_empty(million: None) -> None:
    """Overrides the folder's emptying: every test here reads the same million rows."""


def plan_nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    nodes = [plan]
    for child in plan.get("Plans", []):
        nodes.extend(plan_nodes(child))
    return nodes


def explain(engine: Engine, statement: str, parameters: Any) -> dict[str, Any]:
    """EXPLAIN ANALYZE in a transaction that is rolled back, whatever the statement does."""
    with engine.connect() as conn, conn.begin() as transaction:
        [[raw]] = conn.exec_driver_sql(
            f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {statement}", parameters
        ).all()
        transaction.rollback()
    plan: dict[str, Any] = (raw if isinstance(raw, list) else json.loads(raw))[0]["Plan"]
    return plan


def assert_indexed(engine: Engine, probe: Callable[[], object], *, expected: int) -> None:
    """Each of the probe's ``expected`` outbox statements reads through an index only."""
    statements = sent_by(engine, probe)
    assert expected == len(statements), [s for s, _ in statements]
    for statement, parameters in statements:
        plan = explain(engine, statement, parameters)
        nodes = plan_nodes(plan)
        scans = [n for n in nodes if n["Node Type"] == "Seq Scan"]
        assert not [n for n in scans if n.get("Relation Name") in OUTBOX_TABLES], (
            statement,
            nodes,
        )
        buffers = plan["Shared Hit Blocks"] + plan["Shared Read Blocks"]
        changed = plan["Plans"][0]["Actual Rows"] if plan["Node Type"] == "ModifyTable" else 0
        assert buffers < MAX_BUFFERS + BUFFERS_PER_ROW_CHANGED * changed, (buffers, statement)


def test_the_claim_walks_the_pending_index_in_order(engine: Engine, celery_app: Celery) -> None:
    """The claim's plan: the pending-only index, in its order, no sort."""
    relay = Relay(engine, celery_app, OutboxSettings(batch_size=200))
    claim = relay.claim_query().compile(engine, compile_kwargs={"literal_binds": True})
    plan = explain(engine, str(claim), {})
    nodes = plan_nodes(plan)
    scans = [node for node in nodes if "Scan" in node["Node Type"]]
    assert ["ix_celery_outbox_pending_due"] == [node.get("Index Name") for node in scans], nodes
    assert not [node for node in nodes if node["Node Type"] == "Sort"], "index order, no sort"
    assert plan["Shared Hit Blocks"] + plan["Shared Read Blocks"] < MAX_BUFFERS


def test_the_status_figures_read_through_indexes(engine: Engine) -> None:
    """collect_stats (status, /healthz, /metrics, the dashboard's cards)."""
    assert_indexed(engine, lambda: collect_stats(engine, datetime.now(UTC)), expected=6)
    stats = collect_stats(engine, datetime.now(UTC))
    assert (500 + BUSY_KEYS // 2, 100, 300) == (
        stats.pending,
        stats.dead,
        stats.dispatched_last_minute,
    )
    # Not counted: PostgreSQL's live-row statistics, minus the pending and dead rows
    # (the held rows are in it too).
    with_held = DISPATCHED + BUSY_KEYS * (PER_KEY - 1)
    assert 0.9 * with_held <= stats.dispatched_estimate <= 1.1 * with_held


def test_the_web_probes_read_through_indexes(app: Flask, engine: Engine) -> None:
    """/healthz, /metrics and the dashboard page each send only indexed statements."""
    app.config["OUTBOX_DASHBOARD_PUBLIC"] = True
    client = app.test_client()
    try:
        assert_indexed(engine, lambda: client.get("/healthz"), expected=6)
        assert_indexed(engine, lambda: client.get("/metrics"), expected=6)
        assert_indexed(engine, lambda: client.get("/outbox"), expected=7)
    finally:
        app.config.pop("OUTBOX_DASHBOARD_PUBLIC")


def test_the_latest_dead_rows_come_from_the_dead_index(engine: Engine) -> None:
    """The dashboard's dead rows, newest first, without walking the primary key."""
    assert_indexed(engine, lambda: latest_dead(engine, limit=20), expected=1)


def test_the_confirmation_checks_read_through_indexes(engine: Engine, celery_app: Celery) -> None:
    """Reviving, settling, looking for lost messages (the ordered tasks not started, from
    the busy keys) and overdue tasks, and putting the 50 overdue ones back: the dead,
    deadline and busy-keys indexes, and the primary key."""
    relay = Relay(engine, celery_app, OutboxSettings())
    assert_indexed(engine, relay.confirmation.run_once, expected=6)


def test_the_retention_purge_deletes_through_indexes(engine: Engine) -> None:
    """Old dispatched rows by the dispatched-at index, old dead rows by the dead index."""
    long_ago = datetime.now(UTC) - timedelta(days=30)
    assert_indexed(
        engine,
        lambda: purge_outbox(engine, long_ago, statuses=["dispatched", "dead"]),  # type: ignore[list-item]
        expected=2,
    )


def test_the_ordering_keys_maintenance_reads_through_indexes(
    engine: Engine, celery_app: Celery
) -> None:
    """Dead tasks holding keys (the dead index), a window of busy keys (the busy-keys
    index) and their tasks (the ordering index), finished or started by a process gone
    silent (the workers' primary key): never the idle keys or the history."""
    relay = Relay(engine, celery_app, OutboxSettings())
    assert_indexed(engine, relay.key_keeper.run_once, expected=4)


def in_rolled_back_transaction(engine: Engine, work: Callable[[Connection], object]) -> None:
    with engine.connect() as conn, conn.begin() as transaction:
        work(conn)
        transaction.rollback()


def test_enqueueing_and_handing_a_key_on_read_through_indexes(engine: Engine) -> None:
    """The key's next number (its primary key), then, when its task finishes, the key
    (its primary key), the next held task (the held index) and the key again."""
    now = datetime.now(UTC)
    assert_indexed(
        engine,
        lambda: in_rolled_back_transaction(
            engine, lambda conn: store_for(conn).next_in_line(conn, keys_table, "order:3", now)
        ),
        expected=1,
    )
    assert_indexed(
        engine,
        lambda: in_rolled_back_transaction(
            engine, lambda conn: finish(conn, Place("order:3", 1), now)
        ),
        expected=3,
    )
