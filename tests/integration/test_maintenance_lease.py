"""The outbox-wide maintenance passes run in one relay at a time, elected by a lease in
the database: on PostgreSQL, MariaDB and SQLite (``store_engine``).

Three relays draining side by side run the confirmation and key-keeper passes once per
interval between them, not three times; the holder renews the lease at each pass, and
gives it up when it closes, so another relay takes the passes over at its next one.
A holder that dies without giving it up loses it when it expires, by the database's
clock, whatever the relays' own clocks say.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery import Celery
from kombu.transport import memory
from sqlalchemy import Engine, create_engine, select

from outbox import Relay, TaskOutbox, create_tables
from outbox.data.schema import leases_table
from outbox.maintenance.lease import Lease
from outbox.maintenance.scheduler import MAINTENANCE_INTERVAL
from outbox.relays.loop import RelayLoop
from tests.services import wait_for
from tests.unit.conftest import FakeClock, memory_app


@pytest.fixture
def memory_celery() -> Iterator[Celery]:
    memory.Channel.queues.clear()
    app = memory_app("leases")
    # CELERY_BROKER_URL (this run's Redis) outranks broker=: these outrank it.
    app.conf.broker_url = app.conf.broker_read_url = app.conf.broker_write_url = "memory://"
    yield app
    memory.Channel.queues.clear()


def lease_name() -> str:
    return f"test:{uuid.uuid4().hex[:12]}"


def test_one_holder_at_a_time_until_it_gives_the_lease_up(store_engine: Engine) -> None:
    name = lease_name()
    first, second, third = (Lease(store_engine, name) for _ in range(3))
    assert first.hold(), "nobody held it: the first to ask takes it"
    assert not second.hold()
    assert not third.hold()
    assert first.hold(), "the holder renews it"
    assert first.holder == first.current_holder()
    first.release()
    assert first.current_holder() is None
    assert second.hold(), "given up: the next to ask takes it at once"
    assert not first.hold()
    assert not third.hold()
    assert second.holder == third.current_holder()


def test_a_lease_its_holder_stopped_renewing_goes_to_the_next_relay(store_engine: Engine) -> None:
    name = lease_name()
    gone, next_one = Lease(store_engine, name, seconds=0.3), Lease(store_engine, name)
    assert gone.hold()
    assert not next_one.hold()
    # The holder dies without giving it up: the lease runs out by the database's clock.
    wait_for(next_one.hold, timeout=10, interval=0.05)
    assert not gone.hold(), "a holder back from the dead finds it taken"
    assert next_one.holder == gone.current_holder()


def test_relays_asking_at_once_elect_exactly_one(store_engine: Engine) -> None:
    name = lease_name()
    leases = [Lease(store_engine, name) for _ in range(6)]
    start = threading.Barrier(len(leases))
    held: dict[str, bool] = {}
    errors: list[BaseException] = []

    def ask(lease: Lease) -> None:
        start.wait(timeout=10)
        try:
            held[lease.holder] = lease.hold()
        except BaseException as e:  # reported below, not lost in the thread
            errors.append(e)

    threads = [threading.Thread(target=ask, args=(lease,)) for lease in leases]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert [] == errors
    winners = [holder for holder, won in held.items() if won]
    assert 1 == len(winners), held
    with store_engine.connect() as conn:
        stored = conn.execute(
            select(leases_table.c.holder).where(leases_table.c.name == name)
        ).scalar_one()
    assert winners[0] == stored


def test_three_relays_run_the_outbox_wide_passes_once_per_interval(
    store_engine: Engine, memory_celery: Celery
) -> None:
    """Each relay drains every round, and its heartbeat runs every time; confirmation
    and the key keeper run in one of them per interval. When the holder closes, one of
    the others runs them from the next interval on."""
    clock = FakeClock()  # the relays' schedule; the lease runs on the database's clock
    relays = [Relay(store_engine, memory_celery, clock=clock) for _ in range(3)]
    try:
        passes: list[list[int]] = []
        for _ in range(4):
            passes.append(
                [i for i, relay in enumerate(relays) if relay.drain().confirmation is not None]
            )
            clock.advance(MAINTENANCE_INTERVAL)
        assert 4 == len(passes)
        assert all(1 == len(ran) for ran in passes), f"relays that ran each interval: {passes}"
        assert 1 == len({ran[0] for ran in passes}), "the holder keeps the lease it renews"
        holder = passes[0][0]
        heartbeat_names = {relay.heartbeat.name for relay in relays}
        assert 1 == len(heartbeat_names), "the same host and kind: one heartbeat row"

        relays[holder].close()
        others = [i for i in range(3) if i != holder]
        after: list[list[int]] = []
        for _ in range(3):
            after.append([i for i in others if relays[i].drain().confirmation is not None])
            clock.advance(MAINTENANCE_INTERVAL)
        assert all(1 == len(ran) for ran in after), f"after the holder closed: {after}"
        assert 1 == len({ran[0] for ran in after}), "one of the others holds it now"
    finally:
        for relay in relays:
            relay.close()


def test_an_explicit_pass_runs_whoever_holds_the_lease(
    store_engine: Engine, memory_celery: Celery
) -> None:
    """``Relay.maintain()`` (an operator's or a test's pass) runs every pass at once."""
    clock = FakeClock()
    holder, other = (Relay(store_engine, memory_celery, clock=clock) for _ in range(2))
    try:
        assert holder.drain().confirmation is not None
        assert other.drain().confirmation is None, "not elected: its pass skips them"
        assert other.maintain() is not None
    finally:
        holder.close()
        other.close()


def test_a_relay_loop_stopped_on_purpose_gives_the_lease_up(
    store_engine: Engine, memory_celery: Celery
) -> None:
    """``flask outbox relay`` stopped by SIGTERM: the next relay need not wait 15 s."""
    relay = Relay(store_engine, memory_celery)
    loop = RelayLoop(relay, poll_interval=0.05, listen=False)
    thread = threading.Thread(target=loop.run, name="relay-loop")
    thread.start()
    try:
        lease = relay.maintenance.lease
        assert lease is not None
        wait_for(lambda: lease.current_holder() == lease.holder, timeout=10)
    finally:
        loop.stop()
        thread.join(timeout=30)
        relay.close()
    assert not thread.is_alive()
    assert lease.current_holder() is None


def test_a_lease_that_cannot_be_read_is_reported_and_publishing_goes_on(
    tmp_path: Path, memory_celery: Celery, caplog: pytest.LogCaptureFixture
) -> None:
    """Tables behind the library (the migration that adds the leases not run): the relay
    still publishes, and says what is wrong at each pass."""
    engine = create_engine(f"sqlite:///{tmp_path / 'behind.sqlite3'}")
    create_tables(engine)
    leases_table.drop(engine)

    @memory_celery.task(name="leases.noop", shared=False)
    def noop() -> None: ...

    with engine.begin() as conn:
        TaskOutbox(memory_celery).apply_async("leases.noop", session=conn)
    relay = Relay(engine, memory_celery)
    try:
        with caplog.at_level(logging.ERROR, logger="outbox.maintenance.scheduler"):
            drained = relay.drain()
        assert 1 == drained.published
        assert drained.confirmation is None
        assert "run the outbox's migrations" in caplog.text
        assert "celery_outbox_leases" in caplog.text
    finally:
        relay.close()
        engine.dispose()
