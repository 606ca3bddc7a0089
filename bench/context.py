"""What every section gets: the run's services, sizes and repeats, and shared clients."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import redis
from celery import Celery
from rich.console import Console
from sqlalchemy import Engine

from bench.environment import Services

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Sizes:
    """How much work each section does per run. ``FULL`` keeps a whole run of ``python -m
    bench`` within about fifteen minutes on two cores; ``QUICK`` only proves every path works."""

    #: Requests per variant per run (request path).
    requests: int
    #: Requests per variant before measuring: connections, caches, first-request set-up.
    warmup_requests: int
    #: Consecutive requests of one variant before switching to the next.
    request_block: int
    #: Rows per flush compared (enqueue), and transactions timed per variant per run.
    flush_rows: tuple[int, ...]
    flush_rounds: int
    #: Pending rows drained per run (relay throughput).
    relay_rows: int
    #: Rows per run of the relay-versus-loop comparison without task events.
    bare_rows: int
    #: Rows (or loop tasks) per run of the RabbitMQ comparison, each variant.
    amqp_rows: int
    #: Pending rows per run, and the batch sizes tried (batch-size sweep).
    batch_rows: int
    batch_sizes: tuple[int, ...]
    #: Offered load of the latency section: enqueues per second, for how long.
    latency_rate: float
    latency_seconds: float
    #: Concurrent pgbench writers tried, and seconds per pgbench run (commit wake-up cost).
    wakeup_writers: tuple[int, ...]
    wakeup_seconds: float
    #: INSERTs of one ``mariadb-slap`` run, all clients together (the MariaDB wake-up).
    wakeup_mariadb_queries: int
    #: Rows of the CDC section's backlog, and single-row commits of its driver comparison.
    cdc_backlog_rows: int
    cdc_driver_commits: int
    #: pgbench writers, their total enqueue rate and for how long (many-writer latency).
    fanin_writers: int
    #: How many relay processes publish, in turn (many-writer latency).
    fanin_relays: tuple[int, ...]
    fanin_rate: float
    fanin_seconds: float
    #: Dispatched rows beside the pending batch (backlog scaling), smallest first.
    backlog_levels: tuple[int, ...]
    #: Claims timed per backlog level per run, and per table of the ordering section.
    claim_rounds: int
    #: Dispatched rows beside the probes' realistic backlog (probe scaling), smallest first.
    probe_levels: tuple[int, ...]
    #: Calls of each probe timed per level per run.
    probe_rounds: int
    #: Rows per end-to-end run.
    e2e_rows: int
    #: Ordering keys, and rows per key, of the ordering section's keyed claim table (the
    #: unkeyed one holds as many rows, as many of them pending as there are keys).
    ordering_keys: int
    ordering_rows_per_key: int
    #: Rows per end-to-end run of the ordering section, and the keys of its keyed runs.
    ordering_e2e_rows: int
    ordering_e2e_keys: int
    #: Rows drained under the profiler.
    profile_rows: int
    #: Drains of a single row timed per run (profile: a drain's fixed cost).
    single_drains: int
    #: Unconfirmed tasks on the broker when it restarts without its data (restart).
    restart_rows: int


FULL = Sizes(
    requests=300,
    warmup_requests=30,
    request_block=25,
    flush_rows=(3, 30),
    flush_rounds=300,
    relay_rows=50_000,
    bare_rows=20_000,
    amqp_rows=5_000,
    batch_rows=10_000,
    batch_sizes=(50, 100, 200, 500, 1000),
    latency_rate=200.0,
    latency_seconds=10.0,
    wakeup_writers=(4, 16, 64),
    wakeup_seconds=8.0,
    wakeup_mariadb_queries=40_000,
    cdc_backlog_rows=20_000,
    cdc_driver_commits=200,
    fanin_writers=16,
    fanin_relays=(1, 2),
    fanin_rate=2000.0,
    fanin_seconds=8.0,
    backlog_levels=(0, 100_000, 1_000_000),
    claim_rounds=300,
    probe_levels=(0, 1_000_000),
    probe_rounds=100,
    e2e_rows=5_000,
    ordering_keys=10_000,
    ordering_rows_per_key=100,
    ordering_e2e_rows=1_500,
    ordering_e2e_keys=100,
    profile_rows=20_000,
    single_drains=200,
    restart_rows=1_000,
)
QUICK = Sizes(
    requests=10,
    warmup_requests=2,
    request_block=5,
    flush_rows=(3,),
    flush_rounds=5,
    relay_rows=300,
    bare_rows=200,
    amqp_rows=200,
    batch_rows=200,
    batch_sizes=(50, 200),
    latency_rate=50.0,
    latency_seconds=1.0,
    wakeup_writers=(4,),
    wakeup_seconds=1.0,
    wakeup_mariadb_queries=400,
    cdc_backlog_rows=200,
    cdc_driver_commits=10,
    fanin_writers=4,
    fanin_relays=(1, 2),
    fanin_rate=200.0,
    fanin_seconds=1.0,
    backlog_levels=(0, 1_000, 10_000),
    claim_rounds=10,
    probe_levels=(0, 2_000),
    probe_rounds=10,
    e2e_rows=100,
    ordering_keys=300,
    ordering_rows_per_key=4,
    ordering_e2e_rows=100,
    ordering_e2e_keys=10,
    profile_rows=200,
    single_drains=5,
    restart_rows=20,
)


@dataclass(slots=True)
class Context:
    services: Services
    sizes: Sizes
    repeats: int
    #: Progress goes to stderr's console; tables (the profile's) to ``out``, stdout's.
    console: Console
    out: Console
    #: The benchmark process's own engine on the run's database.
    engine: Engine
    celery_app: Celery
    #: A client on the run's Redis DB (the broker's).
    redis: redis.Redis
    #: Section data for the JSON file beyond the figures (profiles, settings used...).
    extra: dict[str, Any] = field(default_factory=dict)

    def say(self, message: str) -> None:
        """Progress on stderr's console, so a long run shows where it is."""
        self.console.log(message)


def rotated(items: Sequence[T], run: int) -> list[T]:
    """``items`` starting at a different one each run, so no variant always goes first
    (or always runs right after another) and order effects spread over all of them."""
    shift = run % len(items)
    return [*items[shift:], *items[:shift]]
