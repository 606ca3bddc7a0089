"""Redis restarted without persistence loses every queued message: the relay notices the
restart within seconds and publishes every unconfirmed task again.

Nothing consumes the queue until after the restart, so every task is on the broker when
it loses them. The relay runs as ``flask outbox relay`` with the example's default
settings (its confirmation timeout is an hour, which is how long it took before).

Redis restarted from an older copy of its data (an earlier RDB snapshot, a backup, a
lagging replica promoted) keeps the relays' marker but not what was written after the
copy: the confirmation check publishes those tasks again, and only those. Those tests
drive the relay in the test's process, on a clock the test moves forward.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest
from celery import Celery
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from outbox import OutboxStatus, Relay, TaskOutbox, outbox_table
from outbox.data.schema import brokers_table
from tasks.orders import reserve_stock
from tests.chaos.checks import effects_per_order, enqueue_orders, outbox_counts, tally
from tests.chaos.processes import start_relay, start_worker, stop_all
from tests.chaos.redis_server import RedisServer, redis_server
from tests.integration.test_delivery import broker_messages, make_order
from tests.integration.test_lost_messages import Clock, statuses
from tests.services import ChaosReport, app_on, wait_for

ORDERS = 300


def remembered_brokers(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(brokers_table)).scalar_one())


def test_a_broker_that_lost_its_data_gets_every_unconfirmed_task_again(
    engine: Engine, celery_app: Celery, tmp_path: Path, chaos_report: ChaosReport
) -> None:
    """Restart the broker empty: the relay republishes all its tasks; each applies once."""
    queue = f"chaos-restart-{uuid.uuid4().hex[:8]}"
    with redis_server(tmp_path, persistent=False) as broker:
        env = {"CELERY_BROKER_URL": broker.url, "CELERY_RESULT_BACKEND": broker.url}
        orders = enqueue_orders(engine, celery_app, reserve_stock, ORDERS, queue=queue)
        committed = len(orders.committed)
        processes = [start_relay("relay", tmp_path, **env)]
        try:
            wait_for(lambda: {"dispatched": committed} == outbox_counts(engine))
            wait_for(lambda: committed == broker.client.llen(queue))
            # The relay has recorded which broker it publishes to: the restart can be told.
            wait_for(lambda: remembered_brokers(engine))

            broker.kill()
            broker.start()
            restarted_at = time.monotonic()
            lost = committed - broker.client.llen(queue)
            wait_for(lambda: committed == broker.client.llen(queue), timeout=60)
            republished_seconds = time.monotonic() - restarted_at

            processes.append(
                start_worker(
                    "chaos-restart-worker", queue, tmp_path, celery_app, ready_in_log=True, **env
                )
            )
            wait_for(lambda: committed == len(effects_per_order(engine)), timeout=60)
            applied_seconds = time.monotonic() - restarted_at
            relay_log = processes[0].log()
        finally:
            stop_all(processes)
    assert dict.fromkeys(orders.committed, 1) == effects_per_order(engine)
    assert committed == lost, "the restart lost every queued message"
    assert "lost its data (restarted at" in relay_log
    with engine.connect() as conn:
        deliveries = conn.execute(select(outbox_table.c.deliveries).distinct()).scalars().all()
    assert [2] == deliveries, "each task was published once more, not more"
    chaos_report.record(
        messages=ORDERS,
        committed=committed,
        rolled_back=len(orders.rolled_back),
        faults="redis-server without persistence restarted with every task queued",
        lost_by_the_broker=lost,
        republished_seconds_after_restart=round(republished_seconds, 1),
        applied_seconds_after_restart=round(applied_seconds, 1),
        **tally(engine, orders),
    )


def publish(engine: Engine, relay: Relay, queue: str, count: int) -> list[str]:
    """``count`` tasks enqueued in one committed transaction and published by ``relay``."""
    order_id = make_order(engine)
    outbox = TaskOutbox(relay.celery_app)
    with Session(engine) as session:
        ids = [
            outbox.apply_async(reserve_stock, args=(order_id,), queue=queue, session=session).id
            for _ in range(count)
        ]
        session.commit()
    assert count == relay.drain(maintain=False).published
    return ids


def queued_ids(broker: RedisServer, queue: str) -> set[str]:
    return {message["headers"]["id"] for message in broker_messages(broker.client, queue)}


@pytest.mark.parametrize(
    "checked_after_copy", [True, False], ids=["checked-after-the-copy", "not-checked-since"]
)
def test_redis_restored_from_an_older_copy_gets_back_what_came_after_it(
    engine: Engine, tmp_path: Path, checked_after_copy: bool
) -> None:
    """Tasks published after the copy the broker restarts from are published again; those
    it still holds are not. Whether or not a relay checked the broker between the copy and
    the restart (its check count then goes back, else only its instance changes)."""
    queue = f"chaos-restore-{uuid.uuid4().hex[:8]}"
    clock = Clock()
    with redis_server(tmp_path, persistent=False) as broker:
        relay = Relay(engine, app_on(broker.url, "outbox-test-restore"), clock=clock)
        kept = publish(engine, relay, queue, 3)
        assert not relay.confirmation.run_once().broker_data_lost  # first sight: remembered
        copy = broker.snapshot("older")
        clock.advance(30)
        lost = publish(engine, relay, queue, 3)
        if checked_after_copy:
            assert 0 == relay.confirmation.run_once().republished
        clock.advance(30)

        broker.restart_from(copy)
        assert set(kept) == queued_ids(broker, queue), "the copy holds the earlier tasks only"
        result = relay.confirmation.run_once()
        assert 3 == result.republished
        assert {
            **dict.fromkeys(kept, (OutboxStatus.DISPATCHED, 1)),
            **dict.fromkeys(lost, (OutboxStatus.PENDING, 1)),
        } == statuses(engine)
        assert 3 == relay.drain(maintain=False).published
        assert set(kept) | set(lost) == queued_ids(broker, queue)
        assert 0 == relay.confirmation.run_once().republished, "once is enough"


def test_redis_restarted_with_its_latest_data_gets_nothing_again(
    engine: Engine, tmp_path: Path
) -> None:
    """A restart from an append-only file synced on every write keeps every task: its
    check count goes on, it still holds what was published since the last check, and
    nothing is published again."""
    queue = f"chaos-restart-{uuid.uuid4().hex[:8]}"
    clock = Clock()
    with redis_server(tmp_path, persistent=True) as broker:
        relay = Relay(engine, app_on(broker.url, "outbox-test-restart"), clock=clock)
        published = publish(engine, relay, queue, 3)
        relay.confirmation.run_once()
        clock.advance(30)
        published += publish(engine, relay, queue, 3)
        clock.advance(30)

        broker.kill()
        broker.start()
        result = relay.confirmation.run_once()
        assert (0, False) == (result.republished, result.broker_data_lost)
        assert dict.fromkeys(published, (OutboxStatus.DISPATCHED, 1)) == statuses(engine)
        assert set(published) == queued_ids(broker, queue)
