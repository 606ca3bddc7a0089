"""One batch claimed as the relay claims it, from tables of a section's own.

Each claim is the relay's own ``claim_query()`` in a transaction rolled back afterwards,
so the same rows are claimed every time, timed in turn against each table
(:func:`bench.timing.in_rounds`). The claim's time as the relay sees it includes turning
the rows into Python objects (JSONB, UUIDs, timestamps), which costs the same whatever
the table; the server's own execution time (``EXPLAIN ANALYZE`` of the same statement,
timed in the same rounds) is reported beside it, since that is the part a table's size
could slow down.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TypeVar

from sqlalchemy import Connection, Engine, text

from bench.context import Context
from bench.timing import Rounds, in_rounds, timed_ms
from outbox import Relay

V = TypeVar("V")
#: The quantities each round takes, in ms: the claim as the relay sees it, and as the
#: server executes it.
CLAIM, SERVER = "claim", "server execution"


def time_claims(
    ctx: Context, what: str, tables: Mapping[V, Engine], relay: Relay, batch_size: int
) -> Rounds[V]:
    """``claim_rounds`` claims of ``batch_size`` rows per run from each of ``tables``."""
    connections = {variant: engine.connect() for variant, engine in tables.items()}
    try:
        return in_rounds(
            ctx,
            what,
            list(tables),
            ctx.sizes.claim_rounds,
            lambda variant: {
                CLAIM: _claim_ms(connections[variant], relay, batch_size),
                SERVER: _server_ms(connections[variant], relay),
            },
        )
    finally:
        for conn in connections.values():
            conn.close()


def _claim_ms(conn: Connection, relay: Relay, batch_size: int) -> float:
    query = relay.claim_query()
    with conn.begin() as transaction:
        rows, elapsed = timed_ms(lambda: conn.execute(query).all())
        transaction.rollback()
    if len(rows) != batch_size:
        raise RuntimeError(f"claimed {len(rows)} rows, expected {batch_size}")
    return elapsed


def _server_ms(conn: Connection, relay: Relay) -> float:
    claim = relay.claim_query().compile(conn, compile_kwargs={"literal_binds": True})
    with conn.begin() as transaction:
        [[raw]] = conn.execute(text(f"EXPLAIN (ANALYZE, FORMAT JSON) {claim}")).all()
        transaction.rollback()
    plan = raw if isinstance(raw, list) else json.loads(raw)
    return float(plan[0]["Execution Time"])
