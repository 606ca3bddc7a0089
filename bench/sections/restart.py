"""Broker data loss: how long until every unconfirmed task is published again after Redis
restarts without its data.

The section starts a ``redis-server`` of its own (no RDB, no AOF, on a free port, with a
directory of its own), so the machine's Redis is never touched, and a Celery app on it:
the example's configuration with ``orders.reserve_stock`` registered, an idempotent,
acks_late task, so the relay watches each of its rows until a consumer confirms it.
Nothing consumes the queue, and the relay runs in this process.

Each run enqueues ``restart_rows`` rows and has a relay publish them (the rows are
dispatched, their messages wait in the Redis list). The relay measured is another one,
as a relay process would be in the middle of its work: its first drain finds nothing to
publish and runs its maintenance (``relay.maintain()``), which records the broker's
identity and data marker with every row dispatched; its next maintenance is due
``MAINTENANCE_INTERVAL`` later. Then redis-server is SIGKILLed and started again, empty,
on the same port, and the clock starts once the new server answers. Two figures, each
from runs of its own, with a restart each:

- **notice and republish**: ``relay.maintain()`` at once (it finds the data marker gone
  and puts every unconfirmed row dispatched before the restart back to pending), then
  ``relay.drain()`` until every task is on the broker again: the relay's own work, in ms.
  The drains maintain nothing themselves: the relay's last maintenance was moments ago.
- **as a relay process sees it**: ``relay.drain()`` from the restart on, again every
  0.2 s (at once after a drain of several batches), as ``flask outbox relay
  --poll-interval 0.2`` drains, until every task is on the broker again, in seconds. A
  relay maintains every ``MAINTENANCE_INTERVAL`` (5 s; the relay process in a thread of
  its own, a drain here at its start), and this one did just before the restart: the
  worst moment for the broker to lose its data, so the figure is the restart's worst
  case, nearly 5 s of waiting plus the republishing (a restart at a random moment waits
  2.5 s on average).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import redis
from celery import Celery

from bench.celery_app import result_subscriptions
from bench.children import Child, wait_for
from bench.context import Context, rotated
from bench.data import add_pending, empty_queue, empty_tables, queue_length
from bench.results import Figure
from outbox import Relay
from outbox.maintenance.scheduler import MAINTENANCE_INTERVAL
from tests.logical_postgres import free_port

SECTION = "restart"
TASK = "orders.reserve_stock"
QUEUE = "bench.restart"
NOTICE, RUNNING = "notice", "running"
#: The relay loop's wait between drains (``flask outbox relay --poll-interval 0.2``).
POLL_INTERVAL = 0.2
#: Seconds redis-server may take to answer after it is started.
START_TIMEOUT = 10.0
#: Seconds from the restart until every task must be queued again: a run that takes
#: longer is broken, not slow.
REPUBLISH_TIMEOUT = MAINTENANCE_INTERVAL + 60


def run(ctx: Context) -> list[Figure]:
    rows = ctx.sizes.restart_rows
    notice: list[float] = []
    maintenance: list[float] = []
    running: list[float] = []
    # As in the relay command: no result subscriptions for the tasks it publishes.
    with result_subscriptions(False), _redis_server(ctx) as server:
        app = _celery_app(server.url)
        try:
            for run_index in range(ctx.repeats):
                for variant in rotated([NOTICE, RUNNING], run_index):
                    ctx.say(f"restart: run {run_index + 1}/{ctx.repeats}, {variant}, {rows:,}")
                    relay = _dispatched(ctx, server, app, rows)
                    server.restart()
                    if variant == NOTICE:
                        total, maintained = _notice(relay, server, rows)
                        notice.append(total)
                        maintenance.append(maintained)
                    else:
                        running.append(_running(relay, server, rows))
        finally:
            app.close()
    setup = (
        f"{rows:,} unconfirmed {TASK} tasks queued when redis-server (no RDB, no AOF) is "
        "SIGKILLed and restarted empty"
    )
    return [
        Figure(
            SECTION,
            f"notice and republish {rows:,} tasks: maintain() + drain()",
            "ms",
            notice,
            note=setup,
        ),
        Figure(
            SECTION,
            "  of which maintain(): loss noticed, rows back to pending",
            "ms",
            maintenance,
        ),
        Figure(
            SECTION,
            f"restart → all {rows:,} queued again, relay draining every {POLL_INTERVAL:g}s",
            "s",
            running,
            note=(
                f"includes the wait for the relay's next maintenance (every "
                f"{MAINTENANCE_INTERVAL:g}s; its last one ran just before the restart: the "
                "worst case)"
            ),
        ),
    ]


class _Server:
    """The section's redis-server: one process at a time, always on the same port."""

    def __init__(self, log_dir: Path, data_dir: Path) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2)
        self._log_dir = log_dir
        self._data_dir = data_dir
        self._child: Child | None = None

    def start(self) -> None:
        """Start it and wait until it answers."""
        args = [
            "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no", "--daemonize", "no", "--dir", str(self._data_dir),
        ]  # fmt: skip
        self._child = Child("redis-server", args, self._log_dir)
        wait_for(self._answers, START_TIMEOUT, "redis-server answering", self._child, interval=0.01)

    def restart(self) -> None:
        """SIGKILL it (it keeps nothing on disk) and start it again: empty."""
        self.kill()
        self.start()

    def kill(self) -> None:
        if self._child is not None:
            self._child.kill()

    def queued(self) -> int:
        return queue_length(self.client, QUEUE)

    def _answers(self) -> bool:
        try:
            return bool(self.client.ping())
        except redis.RedisError:
            return False


@contextmanager
def _redis_server(ctx: Context) -> Iterator[_Server]:
    """A started server, killed and its directory removed however the section ends."""
    if shutil.which("redis-server") is None:
        raise RuntimeError("the restart section starts a redis-server of its own: none on PATH")
    data_dir = Path(tempfile.mkdtemp(prefix="redis-restart-", dir=ctx.services.work_dir))
    server = _Server(ctx.services.work_dir, data_dir)
    try:
        server.start()
        yield server
    finally:
        server.kill()
        server.client.close()
        shutil.rmtree(data_dir, ignore_errors=True)


def _celery_app(broker_url: str) -> Celery:
    """The example's configuration on ``broker_url``, with the example's ``reserve_stock``
    function (wrapped by ``outbox.idempotent``) registered as it is in ``tasks.orders``:
    the relay publishes only tasks registered with its app."""
    from tasks.orders import RELIABLE, reserve_stock

    app = Celery("bench-restart", set_as_current=False)
    app.config_from_object("celeryconfig")
    # Celery prefers CELERY_BROKER_URL (the run's Redis DB) to broker_url, not to these.
    app.conf.update(broker_read_url=broker_url, broker_write_url=broker_url)
    app.task(name=TASK, **RELIABLE)(reserve_stock.run.__func__)  # type: ignore[call-overload]
    return app


def _dispatched(ctx: Context, server: _Server, app: Celery, rows: int) -> Relay:
    """Enqueue ``rows`` rows and publish them; return a relay that has just maintained,
    with every row dispatched."""
    empty_tables(ctx.engine)
    empty_queue(server.client, QUEUE)
    add_pending(ctx.engine, rows, TASK, {"queue": QUEUE})
    published = Relay(ctx.engine, app).drain().published
    if published != rows or server.queued() != rows:
        raise RuntimeError(f"published {published} of {rows} rows, {server.queued()} queued")
    relay = Relay(ctx.engine, app)
    # A relay's first drain maintains: the broker's identity is on record from here on.
    relay.drain()
    return relay


def _notice(relay: Relay, server: _Server, rows: int) -> tuple[float, float]:
    """``maintain()``, then drains until every task is published again; the whole and the
    maintenance alone, in ms."""
    start = time.perf_counter()
    noticed = relay.maintain()
    maintained = time.perf_counter()
    if not noticed.broker_data_lost or noticed.republished != rows:
        raise RuntimeError(f"maintain() after the restart did not republish {rows} rows: {noticed}")
    published = 0
    while published < rows:
        result = relay.drain()
        if not result.published:
            raise RuntimeError(f"only {published} of {rows} tasks were published again")
        published += result.published
    end = time.perf_counter()
    _check_queued(server, rows)
    return (end - start) * 1000, (maintained - start) * 1000


def _running(relay: Relay, server: _Server, rows: int) -> float:
    """Drain as the relay loop does until every task is published again; seconds."""
    start = time.perf_counter()
    published = 0
    while published < rows:
        if time.perf_counter() - start > REPUBLISH_TIMEOUT:
            raise RuntimeError(
                f"only {published} of {rows} tasks were published again within "
                f"{REPUBLISH_TIMEOUT:g}s of the restart"
            )
        result = relay.drain()
        published += result.published
        if result.batches == 1 and published < rows:
            time.sleep(POLL_INTERVAL)
    elapsed = time.perf_counter() - start
    _check_queued(server, rows)
    return elapsed


def _check_queued(server: _Server, rows: int) -> None:
    found = server.queued()
    if found != rows:
        raise RuntimeError(f"queue {QUEUE!r} holds {found} messages after the restart, not {rows}")
