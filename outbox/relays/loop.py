"""A long-running relay: drains as soon as an enqueue commits, polls as a safety net.

Where the store can notify (PostgreSQL), the loop LISTENs on its channel; the outbox
table's trigger notifies when an inserting transaction commits, so a task is published
within milliseconds of its commit instead of waiting for the next beat sweep. Writers
notify only while the loop says it waits; while it is busy it stands down and looks for
rows itself (``outbox.postgres.wakeups``). A missed notification (the listening connection
dropped, a relay restarting) costs at most one ``poll_interval``.

Where the database cannot notify but serves a cheap check (MariaDB, MySQL: the store's
``due_check_interval``), the loop asks every few tens of milliseconds whether a due row
exists: an index-only read of the first entry of the pending rows' index, which finds
nothing in a few hundred microseconds on an idle outbox, and costs no lock. Elsewhere
(SQLite) the loop just polls.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy.exc import DBAPIError, OperationalError

from outbox.data.schema import listeners_table
from outbox.maintenance.scheduler import MAINTENANCE_INTERVAL
from outbox.postgres.wakeups import (
    BUSY_RATE,
    CALM_RATE,
    QUIET_CHECK_INTERVAL,
    WakeupGate,
    listening_connection,
)
from outbox.relays.batch import DrainResult, Relay

logger = logging.getLogger(__name__)

DEFAULT_POLL_INTERVAL = 1.0
#: Longest pause after a failed drain (database or broker down); doubles from 0.1 s.
MAX_ERROR_BACKOFF = 10.0


class RelayLoop:
    """Runs :meth:`Relay.drain` whenever there may be work, until :meth:`stop` is called.

    ``run_once`` drains once (tests drive the loop with it); ``run`` loops; ``stop`` asks
    the loop to finish the batch in hand and return, which is what SIGTERM should call.
    ``waiting`` is set while the loop waits for work (listening, where it can), and
    ``wakeups`` counts why each wait ended (``notified``, ``timeout``), so a caller can
    tell a loop woken by a commit from one that polled.
    """

    def __init__(
        self, relay: Relay, *, poll_interval: float = DEFAULT_POLL_INTERVAL, listen: bool = True
    ) -> None:
        if poll_interval <= 0:
            raise ValueError(f"poll_interval={poll_interval!r} must be > 0 seconds")
        self.relay = relay
        self.poll_interval = poll_interval
        #: Whether it waits on the database's wake-ups (NOTIFY, due-row checks) or only
        #: polls: beside a CDC relay, which is told of every commit, polling is enough
        #: for the rows left to it, and no commit pays for waking it.
        self.listen = listen
        self._stopping = threading.Event()
        self.waiting = threading.Event()
        self.wakeups: Counter[str] = Counter()
        #: How often the loop stood down, busy: writers stopped notifying it meanwhile.
        self.stand_downs = 0

    def stop(self) -> None:
        self._stopping.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def pause(self, seconds: float) -> bool:
        """Wait ``seconds``, or until stopped: whether it was stopped."""
        return self._stopping.wait(seconds)

    def run_once(self, *, maintain: bool = True) -> DrainResult:
        # Stop between batches, not only between drains: a drain may run for
        # sweep_max_seconds, and SIGTERM should cost at most the batch in hand.
        return self.relay.drain(stop=self._stopping.is_set, maintain=maintain)

    def _maintain_forever(self) -> None:
        """The relay's maintenance (its heartbeat; confirmation checks and the key keeper
        while it holds the lease), now and then every ``MAINTENANCE_INTERVAL``, in this
        thread: a pass reads the database and the broker for a few milliseconds, which a
        commit waiting to be published should not wait for."""
        while not self.stopping:
            try:
                self.relay.maintain_if_due()
            except Exception as e:  # the database or broker is away: the drains say so too
                logger.warning(
                    "relay maintenance failed, trying again in %gs: %s", MAINTENANCE_INTERVAL, e
                )
            self._stopping.wait(MAINTENANCE_INTERVAL)

    def run(
        self,
        on_drain: Callable[[DrainResult], None] | None = None,
        *,
        on_ready: Callable[[str], None] | None = None,
    ) -> None:
        """Loop until stopped: wait for a notification or the poll interval, then drain.

        ``on_ready`` is called once, with how the loop waits, when it first waits for
        work: everything committed before then has been drained.
        """
        maintenance = threading.Thread(
            target=self._maintain_forever, name="outbox-relay-maintenance", daemon=True
        )
        maintenance.start()
        self.relay.keep_connection = True
        try:
            self._loop(on_drain, on_ready)
        finally:
            self.relay.keep_connection = False
            self.relay.release_connection()
            self._stopping.set()
            maintenance.join(timeout=30)
            # Stopped on purpose: another relay takes the maintenance over at once.
            self.relay.maintenance.stop()

    def _loop(
        self,
        on_drain: Callable[[DrainResult], None] | None,
        on_ready: Callable[[str], None] | None,
    ) -> None:
        backoff = 0.0
        with self._listener() as listener:
            while not self.stopping:
                committed_before = self.relay.committed_batches
                try:
                    result = self.run_once(maintain=False)
                except (OperationalError, DBAPIError) as e:
                    if self.relay.committed_batches > committed_before:
                        # The drain got work done before it failed: the database is there,
                        # so start the backoff over rather than doubling it.
                        backoff = 0.0
                    backoff = min(MAX_ERROR_BACKOFF, max(0.1, backoff * 2))
                    logger.warning("relay drain failed, retrying in %.1fs: %s", backoff, e)
                    self._stopping.wait(backoff)
                    continue
                if on_drain is not None:
                    on_drain(result)
                listener.drained(result)
                if result.broker_unavailable:
                    backoff = min(MAX_ERROR_BACKOFF, max(0.1, backoff * 2))
                    self._stopping.wait(backoff)
                    continue
                backoff = 0.0
                if result.batches > 1 and not self.stopping:
                    # The drain stopped on its time budget with work left: go again at once.
                    continue
                if on_ready is not None:
                    on_ready(listener.describe())
                    on_ready = None
                self.waiting.set()
                try:
                    self.wakeups[listener.wait(self.poll_interval)] += 1
                finally:
                    self.waiting.clear()

    def _listener(self) -> _Listener:
        if not self.listen:
            return _Listener(self)
        channel = self.relay.store.notify_channel
        if channel is not None:
            return _NotifyListener(self, channel)
        interval = self.relay.store.due_check_interval
        if interval is not None:
            return _DueRowsListener(self, interval)
        return _Listener(self)


class _Listener:
    """Waits by sleeping: polling only."""

    def __init__(self, loop: RelayLoop) -> None:
        self.loop = loop

    def __enter__(self) -> _Listener:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def describe(self) -> str:
        return f"polling every {self.loop.poll_interval:g}s"

    def drained(self, result: DrainResult) -> None:
        """What the drain before the next wait did (a listener may change how it waits)."""

    def wait(self, timeout: float) -> str:
        """Wait up to ``timeout`` seconds; return why the wait ended."""
        return "stopped" if self.loop.pause(timeout) else "timeout"


class _ConnectedListener(_Listener):
    """Waits on a database connection of its own, closed when the loop ends or breaks."""

    def __init__(self, loop: RelayLoop) -> None:
        super().__init__(loop)
        self._conn: Any = None

    def __exit__(self, *exc: object) -> None:
        self._close()

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        # One SQLAlchemy saw fail is invalidated already: its driver connection is closed.
        driver = None if conn.invalidated else conn.connection.dbapi_connection
        try:
            conn.close()
        except Exception as e:
            # close() rolls back first, which fails on a connection the server cut while
            # it waited (the driver reads it directly, unseen by SQLAlchemy): close the
            # driver's connection itself, and let the loop go on to poll and reconnect
            # rather than die of it.
            logger.debug("closing the lost listening connection: %s", e)
            if driver is not None:
                driver.close()


class _DueRowsListener(_ConnectedListener):
    """Waits by asking the database every ``interval`` seconds whether a row is due, on a
    connection of its own (so the checks never wait for the pool)."""

    def __init__(self, loop: RelayLoop, interval: float) -> None:
        super().__init__(loop)
        self.interval = interval

    def describe(self) -> str:
        return (
            f"checking for due rows every {self.interval * 1000:g} ms, "
            f"polling every {self.loop.poll_interval:g}s as well"
        )

    def wait(self, timeout: float) -> str:
        remaining = timeout
        while remaining > 0:
            if self.loop.pause(min(self.interval, remaining)):
                return "stopped"
            remaining -= self.interval
            if self._due():
                return "found"
        return "timeout"

    def _due(self) -> bool:
        try:
            if self._conn is None:
                self._conn = self.loop.relay.engine.connect()
            found = self.loop.relay.has_due_rows(self._conn)
            # End the read at once: the next check must see the commits made meanwhile.
            self._conn.rollback()
        except Exception as e:  # the database is away: the next drain says so, and backs off
            logger.debug("due-rows check failed: %s", e)
            self._close()
            return True
        return found


class _NotifyListener(_ConnectedListener):
    """Waits on LISTEN, announced in ``celery_outbox_listeners`` so that committing writers
    notify (``outbox.postgres.wakeups``); while busy, stands down and looks for due rows itself.
    Reconnects on the next wait if the connection is lost."""

    def __init__(self, loop: RelayLoop, channel: str) -> None:
        super().__init__(loop)
        self.channel = channel
        self.gate: WakeupGate | None = None
        #: Stood down: writers do not notify, this listener looks for rows itself.
        self.quiet = False
        self._rate = _Activity(self._last_id)

    def __enter__(self) -> _Listener:
        # LISTEN before the first drain, so nothing committed in between goes unnoticed.
        self._connection()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.gate is not None and self._conn is not None:
            try:
                self.gate.unregister()
            except Exception as e:  # its row goes with the connection, at the next check
                logger.debug("cannot remove this relay's listener row: %s", e)
        self._close()

    def describe(self) -> str:
        if self._conn is None:
            return f"LISTEN {self.channel} failed, " + super().describe()
        return f"LISTEN {self.channel}, polling every {self.loop.poll_interval:g}s as well"

    def drained(self, result: DrainResult) -> None:
        # Counted in tasks published and rows inserted, not notifications: a relay woken
        # faster than it drains reads them one wake-up at a time, so their count says
        # how fast it cycles, not how fast writers commit.
        rate = self._rate.add(result.published)
        if self.quiet:
            if rate is not None and rate.calm:
                self.quiet = False
        elif result.batches > 1 or (rate is not None and rate.busy):
            self._stand_down()

    def wait(self, timeout: float) -> str:
        if self._connection() is None:
            return _Listener.wait(self, timeout)
        try:
            if self.quiet:
                return self._wait_quiet(timeout)
            return self._wait_listening(timeout)
        except Exception as e:  # the listening connection broke: poll until it is back
            logger.warning("LISTEN connection lost, polling until it is back: %s", e)
            self._close()
            return _Listener.wait(self, timeout)

    def _wait_quiet(self, timeout: float) -> str:
        remaining = timeout
        while remaining > 0:
            if self.loop.pause(QUIET_CHECK_INTERVAL):
                return "stopped"
            remaining -= QUIET_CHECK_INTERVAL
            if self._due():
                return "found"
            rate = self._rate.add(0)
            if rate is not None and rate.calm:
                self.quiet = False
                return self._wait_listening(remaining)
        return "timeout"

    def _wait_listening(self, timeout: float) -> str:
        gate = self.gate
        if gate is not None and not gate.waiting and gate.announce():
            return "found"
        remaining = timeout
        # While writers that may have read the old state are in their transactions,
        # look again soon, then less and less often.
        settle_step = QUIET_CHECK_INTERVAL
        while remaining > 0 and not self.loop.stopping:
            unsettled = gate if gate is not None and gate.in_flight else None
            # Wake up at least every half second so stop() is honoured promptly.
            step = min(remaining, settle_step if unsettled else 0.5)
            if self._notified(step):
                return "notified"
            remaining -= step
            if unsettled is not None:
                if unsettled.settle():
                    return "found"
                settle_step = min(settle_step * 2, 0.1)
        if self.loop.stopping:
            return "stopped"
        if gate is not None:
            gate.forget_gone()
        return "timeout"

    def _notified(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for a notification."""
        driver = self._conn.connection.dbapi_connection
        if not any(True for _ in driver.notifies(timeout=timeout, stop_after=1)):
            return False
        # Swallow the ones already here: one drain serves them all. A timeout of 0 reads
        # what has arrived without waiting for more.
        for _ in driver.notifies(timeout=0):
            pass
        return True

    def _stand_down(self) -> None:
        self.quiet = True
        self.loop.stand_downs += 1
        self._rate = _Activity(self._last_id)
        if self.gate is not None and self._conn is not None:
            try:
                self.gate.stand_down()
            except Exception as e:  # the next wait finds the connection broken
                logger.debug("cannot stand down: %s", e)

    def _due(self) -> bool:
        return self.loop.relay.has_due_rows(self._conn)

    def _last_id(self) -> int | None:
        if self.gate is None or self._conn is None:
            return None
        try:
            return self.gate.last_id()
        except Exception as e:  # the next wait finds the connection broken
            logger.debug("cannot read the rows inserted: %s", e)
            return None

    def _connection(self) -> Any:
        if self._conn is not None:
            return self._conn
        try:
            conn = listening_connection(self.loop.relay.engine, self.channel)
        except Exception as e:
            logger.warning("cannot LISTEN on %s, polling instead: %s", self.channel, e)
            return None
        self._conn = conn
        self.quiet = False
        self.gate = WakeupGate(conn, lambda: self.loop.relay.has_due_rows(conn))
        try:
            self.gate.register()
        except Exception as e:
            logger.warning(
                "cannot register in %s (%s): committing writers notify on every commit "
                "until the migrations have run",
                listeners_table.name,
                e,
            )
            self.gate = None
        return conn


@dataclass(frozen=True)
class _Rates:
    """Rows a second over one window: tasks the relay published, rows writers inserted
    (``None`` where the listener cannot tell)."""

    published: float
    inserted: float | None

    @property
    def busy(self) -> bool:
        return max(self.published, self.inserted or 0.0) >= BUSY_RATE

    @property
    def calm(self) -> bool:
        return max(self.published, self.inserted or 0.0) < CALM_RATE


class _Activity:
    """Tasks published and rows inserted per second, over windows of at least ``WINDOW``
    seconds; ``last_id`` (the table's id sequence, read once a window) tells the rows
    inserted."""

    WINDOW = 0.1

    def __init__(self, last_id: Callable[[], int | None]) -> None:
        self._last_id = last_id
        self._started = time.monotonic()
        self._count = 0
        self._first_id = last_id()

    def add(self, count: int) -> _Rates | None:
        """Count ``count`` tasks published; the rates of the window this closes, if it
        does."""
        self._count += count
        elapsed = time.monotonic() - self._started
        if elapsed < self.WINDOW:
            return None
        last_id = self._last_id()
        inserted = None
        if last_id is not None and self._first_id is not None:
            inserted = (last_id - self._first_id) / elapsed
        rates = _Rates(self._count / elapsed, inserted)
        self._started, self._count, self._first_id = time.monotonic(), 0, last_id
        return rates
