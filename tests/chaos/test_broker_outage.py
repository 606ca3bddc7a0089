"""Redis SIGKILLed mid-drain and restarted: the relay waits it out, nothing dies or doubles.

The test runs its own redis-server on a free port (AOF with ``appendfsync always``, so
whatever Redis acknowledged survives the kill); the machine's Redis is never touched. A
relay and two workers use it as broker and result backend, on a queue of their own.

Through the outage rows stay pending (never dead) and the relay logs it once; once
Redis is back every row is dispatched, and the restarted Redis's AOF holds a publish of
every task. Redis can still lose a message itself: kombu's Redis transport takes one in
two steps, BRPOP and then an HSET into ``unacked``, and a Redis killed between the two
has removed it (durably) without recording it as in flight. The test reads such losses
from the AOF (a pop with no ``unacked`` record after it) and expects the outbox's
end-to-end confirmation (``OUTBOX_CONFIRM_TIMEOUT``) to publish them again, so every
order still gets exactly one effect.

A Celery worker can also die of the outage (kombu's Redis transport raising
``AttributeError`` while it restores unacknowledged messages on the lost connection:
"Unrecoverable error", exit code 1). The test restarts such a worker as a process
supervisor would, and records how often it happened.
"""

from __future__ import annotations

import re
import time
import uuid
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery import Celery
from sqlalchemy import Engine, select

from outbox import outbox_table
from tasks.orders import reserve_stock
from tests.chaos.checks import (
    effects_per_order,
    enqueue_orders,
    outbox_counts,
    queue_drained,
    tally,
)
from tests.chaos.processes import READY, Process, pause, start_relay, start_worker, stop_all
from tests.chaos.redis_server import RedisServer, redis_server
from tests.services import ChaosReport, wait_for

ORDERS = 1500
WORKERS = 2
OUTAGE_SECONDS = 4.0
#: Kill Redis once the relay is this far into the backlog (and well before it is done).
KILL_AFTER_DISPATCHED = 200
#: Seconds after Redis is back by which every effect must be applied: a lost message is
#: found at two confirmation checks five seconds apart, at least ten seconds after its
#: dispatch, and the workers need a few seconds to reconnect.
EFFECTS_WITHIN = 60
RECEIVED = re.compile(r"Task orders\.reserve_stock\[[0-9a-f-]+\] received")
TASK_ID = re.compile(rb'"id": "([0-9a-f-]{36})"')
PUBLISHED_AGAIN = re.compile(r"(\d+) published again")
UNRECOVERABLE = re.compile(r"Unrecoverable error: .*")


class _AofHistory:
    """What the broker did with each task's messages, replayed from its append-only file."""

    def __init__(self, data_dir: Path) -> None:
        #: Task ids of every message pushed onto a list (publishes and restores).
        self.pushed: set[str] = set()
        #: Task ids of messages popped off a queue and never recorded in ``unacked``
        #: (before the same task was pushed again, or at all): copies the broker lost.
        self.lost: list[str] = []
        lists: dict[bytes, deque[str | None]] = {}
        popped: set[str] = set()  # popped, not yet recorded as held by a consumer
        for command in self._commands(data_dir):
            name = command[0].upper()
            if name in (b"LPUSH", b"RPUSH"):
                items = lists.setdefault(command[1], deque())
                for value in command[2:]:
                    task_id = _task_id(value)
                    if task_id is not None:
                        self.pushed.add(task_id)
                    if task_id in popped:
                        popped.discard(task_id)
                        self.lost.append(task_id)
                    if name == b"LPUSH":
                        items.appendleft(task_id)
                    else:
                        items.append(task_id)
            elif name == b"RPOP" and lists.get(command[1]):
                task_id = lists[command[1]].pop()
                if task_id is not None:
                    popped.add(task_id)
            elif name == b"HSET" and command[1] == b"unacked":
                for value in command[3::2]:
                    popped.discard(str(_task_id(value)))
        self.lost.extend(popped)

    @staticmethod
    def _commands(data_dir: Path) -> Iterator[list[bytes]]:
        """Every command in the incremental AOF files, in order (RESP arrays of bulk strings)."""
        for path in sorted((data_dir / "appendonlydir").glob("*.incr.aof")):
            data, at = path.read_bytes(), 0
            while at < len(data):
                end = data.index(b"\r\n", at)
                count, at = int(data[at + 1 : end]), end + 2
                command = []
                for _ in range(count):
                    end = data.index(b"\r\n", at)
                    size, at = int(data[at + 1 : end]), end + 2
                    command.append(data[at : at + size])
                    at += size + 2
                yield command


def _task_id(message: bytes) -> str | None:
    match = TASK_ID.search(message)
    return match.group(1).decode() if match else None


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[RedisServer]:
    with redis_server(tmp_path, persistent=True) as server:
        yield server


def test_broker_killed_mid_drain_keeps_rows_pending_until_it_is_back(
    engine: Engine,
    celery_app: Celery,
    broker: RedisServer,
    tmp_path: Path,
    chaos_report: ChaosReport,
) -> None:
    """Through a Redis outage rows stay pending, never dead; all are dispatched once it is back."""
    queue = f"chaos-broker-{uuid.uuid4().hex[:8]}"
    env = {"CELERY_BROKER_URL": broker.url, "CELERY_RESULT_BACKEND": broker.url}
    orders = enqueue_orders(engine, celery_app, reserve_stock, ORDERS, queue=queue)
    committed = len(orders.committed)
    with engine.connect() as conn:
        query = select(outbox_table.c.task_id, outbox_table.c.args)
        order_of_task = {str(task_id): args[0] for task_id, args in conn.execute(query)}

    workers = [
        start_worker(f"chaos-bw{i}", queue, tmp_path, celery_app, ready=False, **env)
        for i in range(WORKERS)
    ]
    processes = list(workers)
    crashed: list[Process] = []
    dead_seen = 0

    def supervise() -> None:
        """Restart a worker that exited on its own, as its process supervisor would."""
        for i, worker in enumerate(workers):
            if not worker.alive:
                crashed.append(worker)
                name = f"chaos-bw{i}-restart{len(crashed)}"
                workers[i] = start_worker(name, queue, tmp_path, celery_app, ready=False, **env)
                processes.append(workers[i])

    def counts() -> dict[str, int]:
        nonlocal dead_seen
        supervise()
        found = outbox_counts(engine)
        dead_seen = max(dead_seen, found.get("dead", 0))
        return found

    def effects_done() -> bool:
        supervise()
        return len(effects_per_order(engine)) == committed

    try:
        for worker in workers:
            wait_for(lambda w=worker: not w.alive or READY.search(w.log()), timeout=60)
            assert worker.alive, worker.log()
        relay = start_relay(
            "relay",
            tmp_path,
            OUTBOX_BATCH_SIZE="50",
            **env,
        )
        processes.append(relay)

        wait_for(
            lambda: counts().get("dispatched", 0) >= KILL_AFTER_DISPATCHED,
            timeout=30,
            interval=0.01,
        )
        broker.kill()
        down_at = time.monotonic()
        at_kill = counts()
        assert at_kill.get("pending", 0) > 0, f"the drain was over before the kill: {at_kill}"
        wait_for(lambda: "broker unavailable" in relay.log(), timeout=10)
        while time.monotonic() - down_at < OUTAGE_SECONDS:
            counts()
            pause(0.2)
        during_outage = counts()
        assert relay.alive, relay.log()

        broker.start()
        up_at = time.monotonic()
        outage_seconds = up_at - down_at
        dispatched_in_outage = during_outage.get("dispatched", 0)
        wait_for(lambda: counts().get("dispatched", 0) > dispatched_in_outage, timeout=30)
        resumed_seconds = time.monotonic() - up_at
        wait_for(lambda: {"dispatched": committed} == counts(), timeout=30)
        drain_seconds = time.monotonic() - up_at
        wait_for(effects_done, timeout=EFFECTS_WITHIN)
        effects_seconds = time.monotonic() - up_at
        wait_for(lambda: {"dispatched": committed} == counts(), timeout=30)
        wait_for(lambda: queue_drained(broker.client, queue), timeout=30)
        assert relay.alive, relay.log()
        relay_log = relay.log()
    finally:
        stop_all(processes)
    worker_logs = [process.log() for process in processes if process is not relay]
    crashes = sorted({line for p in crashed for line in UNRECOVERABLE.findall(p.log())})

    assert 0 == dead_seen
    assert 1 == relay_log.count("broker unavailable"), relay_log
    assert 1 == relay_log.count("broker reachable again"), relay_log

    history = _AofHistory(broker.data_dir)
    assert set() == set(order_of_task) - history.pushed, "Redis kept every publish it acked"
    lost_in_broker = [order_of_task[task_id] for task_id in history.lost]
    assert len(lost_in_broker) <= WORKERS, "at most one pop in flight per consumer"
    republished = sum(int(n) for n in PUBLISHED_AGAIN.findall(relay_log))
    assert republished >= len(lost_in_broker), "what Redis lost was published again"
    assert dict.fromkeys(orders.committed, 1) == effects_per_order(engine)
    assert "lost its data" not in relay_log, "the AOF kept the data: nothing republished blindly"

    received = sum(len(RECEIVED.findall(log)) for log in worker_logs)
    chaos_report.record(
        messages=ORDERS,
        committed=committed,
        rolled_back=len(orders.rolled_back),
        faults=f"redis-server SIGKILLed mid-drain ({at_kill.get('dispatched', 0)} of {ORDERS} "
        "rows dispatched), restarted from its AOF",
        **tally(engine, orders),
        lost_by_redis_then_republished=len(lost_in_broker),
        republished_unconfirmed=republished,
        dead=dead_seen,
        workers_crashed_and_restarted=len(crashed),
        worker_crashes=crashes,
        redelivered=received - committed,
        skipped_duplicates=sum(log.count("already processed: skipped") for log in worker_logs),
        outage_seconds=round(outage_seconds, 1),
        relay_resumed_seconds_after_recovery=round(resumed_seconds, 1),
        drain_seconds_after_recovery=round(drain_seconds, 1),
        effects_seconds_after_recovery=round(effects_seconds, 1),
    )
