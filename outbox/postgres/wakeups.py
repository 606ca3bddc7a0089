"""Waking a relay on PostgreSQL without making every commit pay for it.

A NOTIFY is cheap for the one transaction that sends it, but PostgreSQL queues the
commits of all notifying transactions behind one lock, held across each commit's WAL
flush: with tens of writers at once, the wake-up caps the application's whole write rate
(measured in ``docs/benchmarks.md``). It is also needed least when it costs most: a relay
with work to do drains in a loop and needs no wake-up at all.

So the outbox table's trigger notifies only while a relay says it waits on LISTEN: each
listening relay has a row in ``celery_outbox_listeners`` (:class:`WakeupGate`), and the
sequence ``celery_outbox_waiting`` holds how many of them wait, the one value the
trigger's ``WHEN`` reads (a read without a snapshot or a query, which costs writers
nothing measurable). A relay:

* **stands down** (``waiting = false``) while it is busy: draining a backlog, or
  publishing, or writers inserting, more than ``BUSY_RATE`` rows a second (rows inserted
  count too: writers of delayed tasks would otherwise notify on every commit, for rows
  the relay cannot publish yet). It then looks for due rows itself every
  ``QUIET_CHECK_INTERVAL`` (an index-only read) until both rates fall below
  ``CALM_RATE``;
* **announces** (``waiting = true``) before it waits, then checks again, so that a row
  committed by a writer that read the old state is not left for the poll. A writer that
  read ``waiting = false`` may still be in its transaction; the check lists the
  transactions holding a write lock on the outbox table, looks for due rows, and looks
  once more each time the listed transactions have ended. A transaction's commit is
  visible before its locks are released, so a writer not listed has committed where the
  check sees it, and a listed one is seen once it ends. Writers that read the new state
  notify.

A committed row therefore never waits for the poll interval while a relay runs: it is
found by a drain, by the check after an announcement, or by its notification. Only a
writer in REPEATABLE READ or SERIALIZABLE that took its snapshot before an announcement
and inserts after the check reads the old state; the poll interval bounds that one.

A listener's row stays while its connection lives, whatever role each relay connects
as: the connection holds a session-level advisory lock keyed by its own server process
id (``LISTENER_LOCK_SPACE``, pid), and a row counts as gone when no process holds that
lock. ``pg_locks`` shows every session's locks to every role, where ``pg_stat_activity``
hides other roles' session details (``backend_start`` among them) from a role without
``pg_read_all_stats``. A pid alone would not do: it is reused, and a row of a relay
killed would be kept alive by whatever connection got its pid next. The lock goes with
the connection, and a connection that got a dead listener's pid holds it only if it
registered as a listener itself, upserting the row that pid names.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from datetime import datetime
from typing import Any

from sqlalchemy import Executable, delete, exists, func, select, text
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import Connection, Engine

from outbox.clock import utcnow
from outbox.data.schema import COUNT_WAITING, LOCK_LISTENERS, listeners_table, outbox_table

#: Tasks published, or rows inserted, per second above which notifications cost writers
#: more than they save the relay: it stands down and looks for rows itself.
BUSY_RATE = 500.0
#: Rows published and inserted per second below which a relay that stood down waits on
#: LISTEN again.
CALM_RATE = 100.0
#: How often a relay that stood down looks for a due row.
QUIET_CHECK_INTERVAL = 0.001

_l = listeners_table.c

#: Transactions that hold a write lock on the outbox table: the writers that may have
#: read the old state. ``virtualtransaction`` names one transaction of one session. A
#: relation's OID is unique only within its database, hence the database's.
_WRITERS = text(
    "SELECT virtualtransaction FROM pg_locks WHERE locktype = 'relation'"
    " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    " AND relation = CAST(:table AS regclass) AND mode = 'RowExclusiveLock'"
    " AND pid <> pg_backend_pid()"
).bindparams(table=outbox_table.fullname)

#: The outbox table's id sequence: how many rows writers have inserted, rolled back or
#: not, read without a lock or a snapshot.
_ID_SEQUENCE = text("SELECT pg_get_serial_sequence(:table, 'id')").bindparams(
    table=outbox_table.fullname
)
_LAST_ID = text("SELECT pg_sequence_last_value(CAST(:sequence AS regclass))")

#: The first key of the advisory lock a listening connection holds while it lives, the
#: second being its pid ("obxl" in ASCII: the outbox's listeners, apart from the
#: advisory locks an application takes with small numbers).
LISTENER_LOCK_SPACE = 0x6F62786C

_BACKEND_START = text("SELECT backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid()")
_LOCK_LISTENING = text("SELECT pg_advisory_lock(:space, pg_backend_pid())").bindparams(
    space=LISTENER_LOCK_SPACE
)
_UNLOCK_LISTENING = text("SELECT pg_advisory_unlock(:space, pg_backend_pid())").bindparams(
    space=LISTENER_LOCK_SPACE
)

#: Rows of listening connections that no longer exist (a relay killed, its connection
#: cut): each would keep writers notifying for nothing. Told by the advisory lock the
#: row's process holds while it listens, in this database: a lock of two int4 keys
#: shows as ``classid``, ``objid`` and ``objsubid = 2`` in ``pg_locks``.
_FORGET_GONE = delete(listeners_table).where(
    ~exists(
        select(text("1"))
        .select_from(text("pg_locks AS l"))
        .where(text("l.locktype = 'advisory' AND l.granted AND l.objsubid = 2"))
        .where(
            text("l.database = (SELECT oid FROM pg_database WHERE datname = current_database())")
        )
        .where(text("l.classid = CAST(:space AS oid)").bindparams(space=LISTENER_LOCK_SPACE))
        .where(text("l.objid = CAST(celery_outbox_listeners.pid AS oid)"))
        .where(text("l.pid = celery_outbox_listeners.pid"))
    )
)


def listening_connection(engine: Engine, channel: str) -> Connection:
    """A connection of its own, detached from the pool, in autocommit, LISTENing on
    ``channel``: what a relay waits on and announces itself through."""
    conn = engine.connect().execution_options(isolation_level="AUTOCOMMIT")
    try:
        conn.detach()
        # What it writes is a hint: a database crash may lose the last one.
        conn.exec_driver_sql("SET synchronous_commit = off")
        conn.exec_driver_sql(f"LISTEN {channel}")
    except BaseException:
        conn.close()
        raise
    return conn


def relay_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class WakeupGate:
    """One relay's row in ``celery_outbox_listeners``, on its listening connection.

    ``conn`` is in autocommit: each change is visible to writers as soon as it returns.
    ``due`` says whether a row is due (the relay's index-only check), read on ``conn``.
    The methods are the steps of the protocol above, so a test can run them in any
    interleaving with real writers.
    """

    def __init__(self, conn: Connection, due: Callable[[], bool]) -> None:
        self.conn = conn
        self._due = due
        self._id_sequence: str | None = None
        self.pid: int | None = None
        self._started: datetime | None = None
        self.waiting = False
        #: Writers that may have read the old state and had not ended at the last check.
        self.in_flight: frozenset[str] = frozenset()

    def register(self) -> None:
        """Add this relay's row, not waiting; delete the rows of listeners now gone.

        The connection takes its listener lock first, so its row never exists without
        the lock that keeps it from being taken for a gone listener's."""
        if self.pid is None:
            # The key is this process's own pid: no other live session takes it.
            self.conn.execute(_LOCK_LISTENING)
        self.pid = int(self.conn.execute(select(func.pg_backend_pid())).scalar_one())
        self._started = self.conn.execute(_BACKEND_START).scalar_one()
        self._id_sequence = self.conn.execute(_ID_SEQUENCE).scalar_one()
        self._change(_FORGET_GONE, self._upsert(waiting=False))
        self.waiting = False

    def announce(self) -> bool:
        """Say this relay waits, then check: whether a row is due. Writers that may have
        read the old state and are still in their transactions are kept in
        ``in_flight`` for :meth:`settle`."""
        self._set_waiting(True)
        # The writers first, then the rows: a writer missing from the list had ended,
        # so its commit is visible to the check that follows.
        self.in_flight = self._writers()
        return bool(self._due())

    def settle(self) -> bool:
        """Check again once writers listed by :meth:`announce` have ended: whether a
        row is due. ``in_flight`` keeps those that have not."""
        if not self.in_flight:
            return False
        still = self.in_flight & self._writers()
        if still == self.in_flight:
            return False
        self.in_flight = still
        return bool(self._due())

    def stand_down(self) -> None:
        """Say this relay does not wait: writers stop notifying."""
        self.in_flight = frozenset()
        self._set_waiting(False)

    def last_id(self) -> int:
        """The last id writers took for a row (0 before the first): its growth over time
        is their insert rate, whether or not anyone notifies."""
        if self._id_sequence is None:
            return 0
        value = self.conn.execute(_LAST_ID, {"sequence": self._id_sequence}).scalar_one()
        return int(value or 0)

    def forget_gone(self) -> int:
        """Delete the rows of listeners whose connection is gone; how many."""
        return self._change(_FORGET_GONE)

    def unregister(self) -> None:
        if self.pid is not None:
            self._change(delete(listeners_table).where(_l.pid == self.pid))
            self.conn.execute(_UNLOCK_LISTENING)
            self.pid = None

    def _set_waiting(self, waiting: bool) -> None:
        if self.pid is None:
            raise RuntimeError("register() the listener before announcing it")
        self._change(self._upsert(waiting))
        self.waiting = waiting

    def _upsert(self, waiting: bool) -> Executable:
        # An upsert, so a row deleted meanwhile (by hand, or taken for a gone listener's)
        # comes back rather than leaving this relay unannounced.
        row = {
            "pid": self.pid,
            "backend_start": self._started,
            "relay": relay_name(),
            "waiting": waiting,
            "updated_at": utcnow(),
        }
        return (
            pg_insert(listeners_table)
            .values(row)
            .on_conflict_do_update(index_elements=[_l.pid], set_=row)
        )

    def _change(self, *statements: Executable) -> int:
        """Run ``statements`` on the listeners' rows, then set the sequence writers read
        from them, in one transaction under ``LOCK_LISTENERS``; the rows the statements
        changed. The sequence's new value is visible to writers at once, before the
        transaction commits: announcing relies on that, by listing writers only after."""
        driver: Any = self.conn.connection.dbapi_connection
        changed = 0
        # The connection is in autocommit (LISTEN, and the checks' reads): psycopg's
        # transaction block wraps these few statements alone.
        with driver.transaction():
            self.conn.exec_driver_sql(LOCK_LISTENERS)
            for statement in statements:
                changed += self.conn.execute(statement).rowcount or 0
            self.conn.execute(COUNT_WAITING)
        return changed

    def _writers(self) -> frozenset[str]:
        return frozenset(self.conn.execute(_WRITERS).scalars())
