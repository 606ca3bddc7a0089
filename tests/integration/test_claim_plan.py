"""The claim query stays cheap with a million dispatched rows: the plan proves it."""

from __future__ import annotations

import json
from typing import Any

from celery import Celery
from sqlalchemy import Engine, text

from outbox import OutboxSettings, Relay

DISPATCHED = 1_000_000
PENDING = 500

# Dispatched rows became due long ago, pending ones a minute ago: an index that also held
# dispatched rows would make the claim walk past all million of them first.
FILL = """
INSERT INTO celery_outbox (task_id, task_name, args, kwargs, options, status, attempts,
                           created_at, available_at, dispatched_at)
SELECT gen_random_uuid(), 'orders.notify_customer', '[1]'::jsonb, '{}'::jsonb, '{}'::jsonb,
       'dispatched', 1,
       now() - interval '2 days', now() - interval '2 days' + n * interval '1 ms',
       now() - interval '1 day'
FROM generate_series(1, :dispatched) AS n
UNION ALL
SELECT gen_random_uuid(), 'orders.notify_customer', '[1]'::jsonb, '{}'::jsonb, '{}'::jsonb,
       'pending', 0,
       now() - interval '1 minute', now() - interval '1 minute' + n * interval '1 ms',
       NULL::timestamptz
FROM generate_series(1, :pending) AS n
"""


def plan_nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    nodes = [plan]
    for child in plan.get("Plans", []):
        nodes.extend(plan_nodes(child))
    return nodes


def test_claim_reads_a_handful_of_pages_beside_a_million_dispatched_rows(
    engine: Engine, celery_app: Celery
) -> None:
    """EXPLAIN ANALYZE: an index scan on the pending-only index, a few dozen buffers, no sort."""
    with engine.begin() as conn:
        conn.execute(text(FILL), {"dispatched": DISPATCHED, "pending": PENDING})
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("ANALYZE celery_outbox"))

    relay = Relay(engine, celery_app, OutboxSettings(batch_size=200))
    claim = relay.claim_query().compile(engine, compile_kwargs={"literal_binds": True})
    with engine.begin() as conn:
        [[raw]] = conn.execute(text(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {claim}")).all()
        conn.rollback()
    plan = (raw if isinstance(raw, list) else json.loads(raw))[0]["Plan"]
    nodes = plan_nodes(plan)
    scans = [node for node in nodes if "Scan" in node["Node Type"]]
    assert ["ix_celery_outbox_pending_due"] == [node.get("Index Name") for node in scans], nodes
    assert not [node for node in nodes if node["Node Type"] == "Sort"], "index order, no sort"
    buffers = plan["Shared Hit Blocks"] + plan["Shared Read Blocks"]
    # 200 claimed rows fit in a few heap pages plus the index path; a walk over the
    # dispatched rows would touch tens of thousands.
    assert buffers < 500, f"{buffers} buffers for one batch"
    print(
        f"claim of 200 beside {DISPATCHED} dispatched rows: {buffers} buffers, "
        f"{plan['Actual Total Time']:.2f} ms"
    )
