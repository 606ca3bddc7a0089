"""On MariaDB, the claim and the probes read through the status-led indexes beside a
large history of dispatched rows: their plans prove it (EXPLAIN FORMAT=JSON).

MariaDB has no partial indexes: the same index holds every row, led by the status, so
a lookup of the pending (or dead, or dispatched) rows seeks straight to them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from celery import Celery
from sqlalchemy import Engine, text

from outbox import OutboxSettings, Relay, collect_stats
from outbox.admin.search import latest_dead
from outbox.maintenance.retention import purge_outbox
from tests.plans import OUTBOX_TABLE, sent_by
from tests.services import OUTBOX_TABLES, empty

DISPATCHED = 200_000
#: Rows a probe may examine: its own rows and a few index pages, never the history.
MAX_ROWS_READ = 2_000

FILL = """
INSERT INTO celery_outbox (task_id, task_name, args, kwargs, options, status, attempts,
                           deliveries, created_at, available_at, dispatched_at,
                           confirm_deadline)
SELECT REPLACE(UUID(), '-', ''), 'orders.notify_customer', '[1]', '{}', '{}',
       'dispatched', 0, 1,
       UTC_TIMESTAMP(6) - INTERVAL 2 DAY, UTC_TIMESTAMP(6) - INTERVAL 2 DAY + INTERVAL seq SECOND,
       IF(seq > {dispatched} - 300, UTC_TIMESTAMP(6) - INTERVAL 10 SECOND,
          UTC_TIMESTAMP(6) - INTERVAL 1 DAY),
       CASE WHEN seq > {dispatched} - 250 THEN UTC_TIMESTAMP(6) + INTERVAL 1 HOUR
            WHEN seq > {dispatched} - 300 THEN UTC_TIMESTAMP(6) - INTERVAL 1 MINUTE END
FROM seq_1_to_{dispatched}
UNION ALL
SELECT REPLACE(UUID(), '-', ''), 'orders.reserve_stock', '[2]', '{}', '{}', 'pending', 0, 0,
       UTC_TIMESTAMP(6) - INTERVAL 1 MINUTE,
       UTC_TIMESTAMP(6) + INTERVAL (CAST(seq AS SIGNED) - 400) SECOND, NULL, NULL
FROM seq_1_to_500
UNION ALL
SELECT REPLACE(UUID(), '-', ''), 'billing.charge_card', '[3]', '{}', '{}', 'dead', 10, 0,
       UTC_TIMESTAMP(6) - INTERVAL 3 DAY, UTC_TIMESTAMP(6) - INTERVAL 3 DAY, NULL, NULL
FROM seq_1_to_100
"""


#: Ordering keys with tasks in line (the first holds the key, published for even keys,
#: pending for odd ones; the rest are held), tasks per key, and keys now idle.
BUSY_KEYS, PER_KEY, IDLE_KEYS = 500, 20, 20_000
FILL_KEYED = """
INSERT INTO celery_outbox (task_id, task_name, args, kwargs, options, status, attempts,
                           deliveries, created_at, available_at, dispatched_at,
                           ordering_key, ordering_seq)
SELECT REPLACE(UUID(), '-', ''), 'orders.notify_customer', '[4]', '{}', '{}',
       CASE WHEN s.seq > 1 THEN 'held' WHEN k.seq % 2 = 0 THEN 'dispatched' ELSE 'pending' END,
       0, IF(s.seq = 1 AND k.seq % 2 = 0, 1, 0),
       UTC_TIMESTAMP(6) - INTERVAL 1 HOUR,
       UTC_TIMESTAMP(6) - INTERVAL 1 HOUR + INTERVAL s.seq MICROSECOND,
       IF(s.seq = 1 AND k.seq % 2 = 0, UTC_TIMESTAMP(6) - INTERVAL 10 MINUTE, NULL),
       CONCAT('order:', k.seq), s.seq
FROM seq_1_to_{keys} AS k, seq_1_to_{per_key} AS s
"""
FILL_KEYS = """
INSERT INTO celery_outbox_keys (`key`, last_seq, head_seq, head_since, updated_at)
SELECT CONCAT('order:', seq), {per_key}, 1, UTC_TIMESTAMP(6) - INTERVAL 1 HOUR,
       UTC_TIMESTAMP(6)
FROM seq_1_to_{keys}
UNION ALL
SELECT CONCAT('idle:', seq), 3, NULL, NULL, UTC_TIMESTAMP(6) - INTERVAL 1 DAY
FROM seq_1_to_{idle}
"""


def filled(sql: str, **numbers: int) -> str:
    for name, number in numbers.items():
        sql = sql.replace(f"{{{name}}}", str(number))
    return sql


@pytest.fixture(scope="module")
def history(mariadb_engine: Engine) -> Iterator[Engine]:
    empty(mariadb_engine, OUTBOX_TABLES)
    keyed = {"keys": BUSY_KEYS, "per_key": PER_KEY, "idle": IDLE_KEYS}
    with mariadb_engine.begin() as conn:
        conn.execute(text(filled(FILL, dispatched=DISPATCHED)))
        conn.execute(text(filled(FILL_KEYED, **keyed)))
        conn.execute(text(filled(FILL_KEYS, **keyed)))
        conn.execute(text("ANALYZE TABLE celery_outbox, celery_outbox_keys"))
    yield mariadb_engine
    empty(mariadb_engine, OUTBOX_TABLES)


@pytest.fixture(autouse=True)
def _each_test_starts_empty(history: Engine) -> None:
    """Overrides the folder's emptying: every test here reads the same rows."""


def table_accesses(plan: Any) -> list[dict[str, Any]]:
    """Every ``table`` node of an EXPLAIN FORMAT=JSON plan."""
    found = []
    if isinstance(plan, dict):
        if "table_name" in plan:
            found.append(plan)
        for value in plan.values():
            found.extend(table_accesses(value))
    elif isinstance(plan, list):
        for value in plan:
            found.extend(table_accesses(value))
    return found


def explain(engine: Engine, statement: str, parameters: Any) -> dict[str, Any]:
    """ANALYZE FORMAT=JSON (it runs the statement) in a transaction that is rolled back."""
    with engine.connect() as conn, conn.begin() as transaction:
        [[raw]] = conn.exec_driver_sql(f"ANALYZE FORMAT=JSON {statement}", parameters).all()
        transaction.rollback()
    plan: dict[str, Any] = json.loads(raw)
    return plan


def assert_indexed(engine: Engine, probe: Callable[[], object], *, expected: int) -> None:
    """Each of the probe's outbox statements seeks through an index and reads few rows."""
    statements = sent_by(engine, probe)
    assert expected == len(statements), [s.split("WHERE")[0] for s, _ in statements]
    for statement, parameters in statements:
        plan = explain(engine, statement, parameters)
        accesses = table_accesses(plan)
        outbox = [a for a in accesses if OUTBOX_TABLE.fullmatch(a["table_name"])]
        # A MIN or MAX answered from an index's end reads no table at all.
        assert outbox or "optimized away" in json.dumps(plan), (statement, plan)
        for access in outbox:
            assert "ALL" != access["access_type"], (statement, access)
            read = (access.get("r_rows") or 0) * (access.get("r_loops") or 1)
            assert read < MAX_ROWS_READ, (
                statement,
                access,
            )


def test_the_claim_seeks_the_pending_rows_in_index_order(
    history: Engine, celery_app: Celery
) -> None:
    """The claim's plan: a range of the status-led index, in its order, no filesort."""
    relay = Relay(history, celery_app, OutboxSettings(batch_size=200))
    claim = relay.claim_query().compile(history, compile_kwargs={"literal_binds": True})
    plan = explain(history, str(claim), {})
    [access] = table_accesses(plan)
    assert ("ix_celery_outbox_pending_due", "range") == (access["key"], access["access_type"])
    assert "filesort" not in json.dumps(plan), plan
    assert 200 == access["r_rows"]


def test_the_status_figures_and_dead_rows_read_through_indexes(history: Engine) -> None:
    stats = collect_stats(history, datetime.now(UTC))
    assert (500 + BUSY_KEYS // 2, 100) == (stats.pending, stats.dead)
    # PostgreSQL's six, and the row estimate, which reads the primary key's two ends
    # here (there, the statistics).
    assert_indexed(history, lambda: collect_stats(history, datetime.now(UTC)), expected=7)
    assert_indexed(history, lambda: latest_dead(history, limit=20), expected=1)


def test_the_retention_purge_deletes_through_indexes(history: Engine) -> None:
    long_ago = datetime.now(UTC) - timedelta(days=30)
    assert_indexed(
        history,
        lambda: purge_outbox(history, long_ago, statuses=["dispatched", "dead"]),  # type: ignore[list-item]
        expected=2,
    )


def test_the_confirmation_checks_read_through_indexes(history: Engine, celery_app: Celery) -> None:
    relay = Relay(history, celery_app, OutboxSettings())
    assert_indexed(history, relay.confirmation.run_once, expected=6)


def test_the_ordering_keys_maintenance_reads_through_indexes(
    history: Engine, celery_app: Celery
) -> None:
    """Dead tasks holding keys, a window of busy keys and their tasks (finished, or
    started by a process gone silent): never the idle keys or the history."""
    relay = Relay(history, celery_app, OutboxSettings())
    assert_indexed(history, relay.key_keeper.run_once, expected=4)
