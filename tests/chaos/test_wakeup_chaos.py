"""Sixteen concurrent writers while relays are SIGKILLed and restarted: each committed row
is published soon after its commit once a relay is up, and applied once.

Two relay processes run the plain ``flask --app webapp outbox relay`` (its default poll
interval). Writers enqueue one order per transaction, some rolled back, at a pace that
changes as they go, so the relays wait on LISTEN, are woken, stand down while busy and
announce again many times over. Meanwhile one relay, or both, is killed and restarted.

Counted, per committed row: the time from its commit until a relay marked it dispatched,
less the time when no relay was up (both killed, until one was ready again). Rows
published twice (a relay killed between its publish and its mark) are counted from the
consumer's skips. Lost, duplicate and phantom effects must be zero.
"""

from __future__ import annotations

import random
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
import redis
from celery import Celery
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from outbox import TaskOutbox, outbox_table
from outbox.relays.loop import DEFAULT_POLL_INTERVAL
from tasks.orders import reserve_stock
from tests.chaos.checks import (
    Orders,
    create_orders,
    effects_per_order,
    queue_drained,
    skipped_duplicates,
    tally,
)
from tests.chaos.processes import Process, pause
from tests.services import ChaosReport, wait_for

pytestmark = pytest.mark.postgresql

WRITERS = 16
#: Orders made beforehand; writers take them until the faults are over.
ORDER_POOL = 8000
#: Every this many transactions of a writer, one rolls back.
ROLLBACK_EVERY = 10
#: Fault rounds: each SIGKILLs one relay, every third both, and restarts them.
ROUNDS = 6
#: Writers write back to back for ``BURST`` seconds, then slowly for ``LULL`` seconds.
BURST, LULL = 2.0, 1.0
READY = "relay: ready"


class Relays:
    """Two relay processes, each restarted at once after a kill."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.starts = 0
        self.processes: dict[str, Process] = {}
        #: (from, until) when no relay was ready: both killed, until one was again.
        self.down: list[tuple[datetime, datetime]] = []
        self.kills = 0

    def start(self, name: str) -> Process:
        self.starts += 1
        process = Process(
            f"{name}-{self.starts}",
            [sys.executable, "-m", "flask", "--app", "webapp", "outbox", "relay"],
            {},
            self.tmp_path,
        )
        self.processes[name] = process
        return process

    def ready(self, *processes: Process) -> None:
        """Wait until one of ``processes`` has drained what there was and waits."""
        wait_for(lambda: any(READY in p.log() or not p.alive for p in processes), timeout=60)
        assert all(p.alive for p in processes), [p.log() for p in processes]

    def kill(self, names: list[str]) -> None:
        """SIGKILL ``names`` and start them again; wait until they are ready, so the next
        round kills a relay at work; record when none was ready."""
        killed_at = datetime.now(UTC)
        for name in names:
            self.processes[name].kill()
            self.kills += 1
        restarted = [self.start(name) for name in names]
        if len(names) == len(self.processes):
            self.ready(*restarted)
            self.down.append((killed_at, datetime.now(UTC)))
        for process in restarted:
            self.ready(process)

    def stop(self) -> None:
        for process in self.processes.values():
            process.stop()

    def waited_while_up(self, committed: datetime, dispatched: datetime) -> float:
        """Seconds from ``committed`` to ``dispatched``, less those when no relay was up."""
        down = sum(
            max(0.0, (min(end, dispatched) - max(start, committed)).total_seconds())
            for start, end in self.down
        )
        return (dispatched - committed).total_seconds() - down


class Writers:
    """Sixteen threads enqueueing one order per transaction until told to stop."""

    def __init__(self, engine: Engine, celery_app: Celery, order_ids: list[int]) -> None:
        self.engine = engine
        self.outbox = TaskOutbox(celery_app)
        self._ids = iter(order_ids)
        self.orders = Orders()
        #: Committed task id -> when its COMMIT returned.
        self.commits: dict[str, datetime] = {}
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._started = time.monotonic()
        self.threads = [threading.Thread(target=self._write, args=(n,)) for n in range(WRITERS)]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    @property
    def writing(self) -> bool:
        return any(thread.is_alive() for thread in self.threads)

    def stop(self) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout=60)

    def _next(self) -> int | None:
        with self._lock:
            return next(self._ids, None)

    def _write(self, seed: int) -> None:
        rng = random.Random(seed)
        number = 0
        while not self.stopping.is_set() and (order_id := self._next()) is not None:
            number += 1
            with Session(self.engine) as session:
                result = self.outbox.apply_async(reserve_stock, args=(order_id,), session=session)
                if number % ROLLBACK_EVERY == 0:
                    session.rollback()
                    with self._lock:
                        self.orders.rolled_back.append(order_id)
                    continue
                session.commit()
                committed = datetime.now(UTC)
            with self._lock:
                self.orders.committed.append(order_id)
                self.commits[result.id] = committed
            if (time.monotonic() - self._started) % (BURST + LULL) > BURST:
                # The lull: a few transactions a second, so relays go back to waiting.
                pause(rng.uniform(0.1, 0.5))


def test_concurrent_writers_while_relays_are_killed(
    engine: Engine,
    celery_app: Celery,
    worker: str,
    worker_log: Path,
    redis_client: redis.Redis,
    tmp_path: Path,
    chaos_report: ChaosReport,
) -> None:
    relays = Relays(tmp_path)
    skipped_before = skipped_duplicates(worker_log)
    writers = Writers(engine, celery_app, create_orders(engine, ORDER_POOL))
    rng = random.Random(20261203)
    kills_while_writing = 0
    try:
        for name in ("relay-a", "relay-b"):
            relays.ready(relays.start(name))
        writers.start()
        for round_ in range(ROUNDS):
            pause(rng.uniform(0.2, 0.6))
            both = round_ % 3 == 2
            names = ["relay-a", "relay-b"] if both else [rng.choice(["relay-a", "relay-b"])]
            if writers.writing:
                kills_while_writing += len(names)
            relays.kill(names)
        writers.stop()
        committed = len(writers.orders.committed)
        wait_for(lambda: len(effects_per_order(engine)) == committed, timeout=120)
        wait_for(lambda: queue_drained(redis_client, "celery"), timeout=60)
    finally:
        writers.stop()
        relays.stop()

    orders = writers.orders
    dispatched = dispatch_times(engine)
    waits = sorted(
        relays.waited_while_up(at, dispatched[task_id]) for task_id, at in writers.commits.items()
    )
    assert dict.fromkeys(orders.committed, 1) == effects_per_order(engine)
    assert kills_while_writing == relays.kills, "every kill landed while writers wrote"
    chaos_report.record(
        messages=len(orders),
        committed=len(orders.committed),
        rolled_back=len(orders.rolled_back),
        writers=WRITERS,
        faults=f"relays SIGKILLed {relays.kills} times, both at once {len(relays.down)} times",
        published_twice=skipped_duplicates(worker_log) - skipped_before,
        wait_p50_ms=round(percentile(waits, 50) * 1000, 1),
        wait_p99_ms=round(percentile(waits, 99) * 1000, 1),
        wait_max_ms=round(waits[-1] * 1000, 1),
        waited_longer_than_poll_interval=sum(wait > DEFAULT_POLL_INTERVAL for wait in waits),
        **tally(engine, orders),
    )


def dispatch_times(engine: Engine) -> dict[str, datetime]:
    """When each row was marked dispatched, by task id."""
    _t = outbox_table.c
    with engine.connect() as conn:
        rows = conn.execute(select(_t.task_id, _t.dispatched_at)).all()
    return {str(task_id): at for task_id, at in rows}


def percentile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, round((len(ordered) - 1) * q / 100))]
