"""Preparing the tables and the broker between runs: outbox rows in bulk, empty queues.

Rows are inserted server-side (one ``INSERT ... SELECT`` over ``generate_series``) so
filling 50,000 or a million of them takes seconds, and they hold what an enqueue writes
for ``task.delay(n)``: args ``[n]``, kwargs ``{}``, the stored publish options (``{}``
unless a queue is named), a fresh UUID task id, due a minute ago and in id order.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import redis
from sqlalchemy import Engine, create_engine, text

from outbox import create_tables
from tests.redis_claim import REDIS_CLAIM_KEY

#: The queue the example's tasks go to (``task_default_queue``).
DEFAULT_QUEUE = "celery"
#: kombu's Redis transport keeps priorities other than 0 in keys with this separator.
_PRIORITY_SEPARATOR = "\x06\x16"
_PRIORITY_STEPS = (3, 6, 9)

_PENDING = """
INSERT INTO celery_outbox (task_id, task_name, args, kwargs, options, status, attempts,
                           created_at, available_at)
SELECT gen_random_uuid(), :task_name, jsonb_build_array(n), '{}'::jsonb,
       CAST(:options AS jsonb), 'pending', 0,
       now() - interval '1 minute', now() - interval '1 minute' + n * interval '1 microsecond'
FROM generate_series(1, :rows) AS n
"""

# As in tests/integration/test_claim_plan.py: dispatched rows became due long ago, so an
# index that also held them would make the claim walk past every one of them first.
_DISPATCHED = """
INSERT INTO celery_outbox (task_id, task_name, args, kwargs, options, status, attempts,
                           created_at, available_at, dispatched_at)
SELECT gen_random_uuid(), :task_name, jsonb_build_array(n), '{}'::jsonb, '{}'::jsonb,
       'dispatched', 1,
       now() - interval '2 days', now() - interval '2 days' + n * interval '1 ms',
       now() - interval '1 day'
FROM generate_series(1, :rows) AS n
"""

_TABLES = (
    "celery_outbox, celery_outbox_processed, notifications, stock_reservations, shipments, orders"
)


def add_pending(
    engine: Engine,
    rows: int,
    task_name: str = "orders.notify_customer",
    options: dict[str, Any] | None = None,
    *,
    analyze_after: bool = True,
) -> None:
    """Insert ``rows`` due pending rows, then ANALYZE so that every run plans alike."""
    with engine.begin() as conn:
        conn.execute(
            text(_PENDING),
            {"task_name": task_name, "options": json.dumps(options or {}), "rows": rows},
        )
    if analyze_after:
        analyze(engine)


def add_dispatched(engine: Engine, rows: int, task_name: str = "orders.notify_customer") -> None:
    with engine.begin() as conn:
        conn.execute(text(_DISPATCHED), {"task_name": task_name, "rows": rows})


def analyze(engine: Engine, *tables: str, vacuum: bool = False) -> None:
    """ANALYZE ``tables`` (the outbox table by default), after a VACUUM with ``vacuum``."""
    command = "VACUUM ANALYZE" if vacuum else "ANALYZE"
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        for table in tables or ("celery_outbox",):
            conn.execute(text(f"{command} {table}"))


def empty_tables(engine: Engine) -> None:
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(text(f"TRUNCATE {_TABLES}"))
            return
        for table in _TABLES.split(", "):
            conn.execute(text(f"DELETE FROM {table}"))  # noqa: S608 - the example's own tables


def count_status(engine: Engine, status: str) -> int:
    with engine.connect() as conn:
        found: int = conn.execute(
            text("SELECT count(*) FROM celery_outbox WHERE status = :status"), {"status": status}
        ).scalar_one()
    return found


def waiting_listeners(engine: Engine, relay: str | None = None) -> int:
    """How many relays say in ``celery_outbox_listeners`` that they wait on LISTEN (only
    ``relay``, named ``host:pid``, if given): from then on every commit notifies them."""
    query = "SELECT count(*) FROM celery_outbox_listeners WHERE waiting"
    with engine.connect() as conn:
        if relay is None:
            found: int = conn.execute(text(query)).scalar_one()
        else:
            found = conn.execute(text(query + " AND relay = :relay"), {"relay": relay}).scalar_one()
    return found


def queue_keys(queue: str) -> list[str]:
    """The Redis keys kombu keeps ``queue``'s messages in (one per priority level)."""
    return [queue, *(f"{queue}{_PRIORITY_SEPARATOR}{step}" for step in _PRIORITY_STEPS)]


def queue_length(client: redis.Redis, queue: str = DEFAULT_QUEUE) -> int:
    return sum(int(client.llen(key)) for key in queue_keys(queue))


def empty_queue(client: redis.Redis, queue: str = DEFAULT_QUEUE) -> None:
    """Drop ``queue``'s messages. Only its message lists: kombu's binding keys stay, since a
    producer that declared the queue once does not declare it again, and without its
    binding a message would be routed nowhere."""
    keys = queue_keys(queue)
    assert REDIS_CLAIM_KEY not in keys
    client.delete(*keys)


@contextmanager
def schemas_of_its_own(engine: Engine, database_url: str) -> Iterator[Callable[[str], Engine]]:
    """``make(schema)``: a fresh ``schema`` holding the outbox's tables, and an engine whose
    connections find them first (``search_path``), so the library's own statements run
    unchanged against tables of the size a section wants. When the block ends, however
    it ends, the engines are disposed of and the schemas dropped."""
    made: dict[str, Engine] = {}

    def make(schema: str) -> Engine:
        with engine.begin() as conn:
            conn.execute(text(f"DROP SCHEMA IF EXISTS {schema} CASCADE"))
            conn.execute(text(f"CREATE SCHEMA {schema}"))
        own = made[schema] = create_engine(
            database_url, connect_args={"options": f"-c search_path={schema}"}
        )
        create_tables(own)
        return own

    try:
        yield make
    finally:
        for own in made.values():
            own.dispose()
        with engine.begin() as conn:
            for schema in made:
                conn.execute(text(f"DROP SCHEMA IF EXISTS {schema} CASCADE"))
