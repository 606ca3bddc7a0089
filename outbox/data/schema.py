"""The outbox table: one row per task the application intends to run.

The table lives on its own :class:`~sqlalchemy.MetaData` so an application can create it
next to its own tables (``create_tables``) or, later, through migrations, without the
library needing to know the application's declarative base.
"""

from __future__ import annotations

import enum
import uuid
from contextlib import nullcontext
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import (
    DDL,
    BigInteger,
    Boolean,
    DateTime,
    Enum,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
    Uuid,
    event,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Connection, Dialect, Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import JSON, TypeEngine

from outbox.data import known_store
from outbox.data.postgresql import NOTIFY_CHANNEL, SOME_RELAY_WAITING, WAITING_SEQUENCE

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = MetaData(naming_convention=NAMING_CONVENTION)


class OutboxStatus(enum.StrEnum):
    """Where a row is in its life. Stored as text so new states need no type migration."""

    PENDING = "pending"
    #: Has an ordering key, and an earlier task of that key has not finished yet: it
    #: becomes pending when that one does (``outbox.ordering.keys``).
    HELD = "held"
    DISPATCHED = "dispatched"
    DEAD = "dead"


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend.

    SQLite and MySQL have no time zone type (the store says so, and which column type
    keeps microseconds): values are stored as naive UTC, and normalising here means the
    rest of the library only ever compares aware datetimes.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        store = known_store(dialect.name)
        return dialect.type_descriptor(store.timestamp_type if store else self.impl)

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: pass a timezone-aware datetime")
        value = value.astimezone(UTC)
        store = known_store(dialect.name)
        return value.replace(tzinfo=None) if store and store.naive_timestamps else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class TaskIdType(TypeDecorator[uuid.UUID]):
    """A task id: the store's UUID column type (PostgreSQL's ``uuid``, 32 hex characters
    elsewhere), whatever the connection URL's scheme picks by default."""

    impl = Uuid()
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        store = known_store(dialect.name)
        return dialect.type_descriptor(store.uuid_type if store else self.impl)


#: JSONB on PostgreSQL (indexable, compact), JSON text elsewhere.
JSONType = JSON().with_variant(JSONB(), "postgresql")
#: SQLite only auto-increments INTEGER PRIMARY KEY, not BIGINT.
BigIntegerPK = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    metadata = metadata


class OutboxMessage(Base):
    """A task recorded in the caller's transaction, waiting to be (or already) published.

    ``args``, ``kwargs`` and ``options`` hold the JSON that Celery's serializer produced at
    enqueue time (kombu's tagged form for datetimes, UUIDs and decimals), so what the relay
    publishes is what was validated. (PostgreSQL's JSONB normalises how numbers are
    written: ``1e20`` comes back as an integer.)
    """

    __tablename__ = "celery_outbox"

    id: Mapped[int] = mapped_column(BigIntegerPK, primary_key=True, autoincrement=True)
    task_id: Mapped[uuid.UUID] = mapped_column(TaskIdType(), unique=True, nullable=False)
    task_name: Mapped[str] = mapped_column(String(255), nullable=False)
    args: Mapped[list[Any]] = mapped_column(JSONType, nullable=False)
    kwargs: Mapped[dict[str, Any]] = mapped_column(JSONType, nullable=False)
    options: Mapped[dict[str, Any]] = mapped_column(JSONType, nullable=False)
    status: Mapped[OutboxStatus] = mapped_column(
        Enum(
            OutboxStatus,
            native_enum=False,
            create_constraint=False,
            length=16,
            values_callable=lambda statuses: [s.value for s in statuses],
        ),
        nullable=False,
        default=OutboxStatus.PENDING,
    )
    #: Publishes that failed because of the row itself; ``max_attempts`` of them make it
    #: ``dead``. A broker outage charges nothing.
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    #: Times the row's task was published. More than one means it was published again
    #: because no consumer confirmed it (``outbox.maintenance.confirmation``); ``max_deliveries``
    #: publishes without a confirmation make it ``dead`` until one arrives.
    deliveries: Mapped[int] = mapped_column(Integer, nullable=False, default=0, server_default="0")
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    available_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    dispatched_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    #: Set when a task with an idempotent consumer is dispatched, and moved forward by
    #: each sign of life (``outbox.maintenance.confirmation``): if the consumer has not recorded the
    #: task id as processed by then, the message is presumed lost and the row is
    #: published again. Cleared once the consumer's record is seen.
    confirm_deadline: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # The task's life after publishing, reported by the worker (``outbox.consumers.lifecycle``):
    # what Flower shows while it still holds the task, kept here as long as the row.
    #: Celery's state name after the latest run (SUCCESS, FAILURE, RETRY; STARTED while
    #: running when start tracking is on); NULL until a worker reports.
    task_state: Mapped[str | None] = mapped_column(String(16))
    task_started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    task_finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    #: ``ExcType: message`` of the latest failed or retried run (kept after a later
    #: success, so a task that needed a retry still says why).
    task_error: Mapped[str | None] = mapped_column(Text)
    #: How many times a worker ran the task (retries and redeliveries included).
    task_runs: Mapped[int] = mapped_column(Integer, nullable=False, default=0, server_default="0")
    #: When the latest run asked to be retried (``self.retry(countdown=...)``), when that
    #: retry is due: the task is alive until then, however long the countdown.
    task_retry_eta: Mapped[datetime | None] = mapped_column(UTCDateTime)
    #: The worker process running the task (``node:pid``), recorded as an ordered task
    #: starts: while it runs, its key waits, and if that process stops beating
    #: (``celery_outbox_workers``) the key is reported stuck (``outbox.ordering.keys``).
    task_worker: Mapped[str | None] = mapped_column(String(255))
    #: Tasks with the same key run one after another, in the order their enqueuing
    #: transactions committed (``outbox.ordering.keys``); NULL for unordered tasks.
    ordering_key: Mapped[str | None] = mapped_column(String(255))
    #: The row's place in its key's commit order, from ``celery_outbox_keys``.
    ordering_seq: Mapped[int | None] = mapped_column(BigInteger)
    # Where the relay published the task (the route the app's router gave it, with its
    # arguments and the task's own options), recorded as it marks the row dispatched:
    # the confirmation checks look for the message there. NULL until published, and
    # for an exchange the message reached without a queue of its own.
    published_queue: Mapped[str | None] = mapped_column(String(255))
    published_exchange: Mapped[str | None] = mapped_column(String(255))
    published_routing_key: Mapped[str | None] = mapped_column(String(255))

    __table_args__ = (
        # The relay's claim query walks this index in order and stops at the first row
        # that is not due yet: only pending rows are in it, so millions of dispatched
        # rows cost nothing. The indexes on a status lead with it: where there are no
        # partial indexes (MariaDB, MySQL) the same index holds every row, and the
        # status still takes the lookup straight to its rows.
        Index(
            "ix_celery_outbox_pending_due",
            "status",
            "available_at",
            "id",
            postgresql_where=text("status = 'pending'"),
            sqlite_where=text("status = 'pending'"),
        ),
        # A key's task by its place in the key (the task holding it, the key keeper's
        # and unblock's lookups); unordered rows are not in it. Not unique, although a
        # key's places are never handed out twice (its row keeps the count, and is kept
        # while any row of the key is): on MariaDB and MySQL a unique index's duplicate
        # check takes gap locks, and writers to different keys would wait for each other.
        Index(
            "ix_celery_outbox_ordering",
            "ordering_key",
            "ordering_seq",
            postgresql_where=text("ordering_key IS NOT NULL"),
            sqlite_where=text("ordering_key IS NOT NULL"),
        ),
        # The next task of a key, found when the one before it finishes.
        Index(
            "ix_celery_outbox_held",
            "status",
            "ordering_key",
            "ordering_seq",
            postgresql_where=text("status = 'held'"),
            sqlite_where=text("status = 'held'"),
        ),
        # Dead rows: counted, listed newest first, and purged by age, without reading the
        # dispatched ones.
        Index(
            "ix_celery_outbox_dead",
            "status",
            "created_at",
            "id",
            postgresql_where=text("status = 'dead'"),
            sqlite_where=text("status = 'dead'"),
        ),
        # The retention cleanup deletes the oldest dispatched rows first; the rate of the
        # last minute reads its newest end.
        Index(
            "ix_celery_outbox_dispatched_at",
            "status",
            "dispatched_at",
            postgresql_where=text("status = 'dispatched'"),
            sqlite_where=text("status = 'dispatched'"),
        ),
        # Only rows awaiting confirmation are in it: the redelivery check stays cheap.
        Index(
            "ix_celery_outbox_confirm_deadline",
            "confirm_deadline",
            postgresql_where=text("confirm_deadline IS NOT NULL"),
            sqlite_where=text("confirm_deadline IS NOT NULL"),
        ),
    )

    def __repr__(self) -> str:
        return (
            f"<OutboxMessage id={self.id} task_id={self.task_id} "
            f"task_name={self.task_name!r} status={self.status}>"
        )


class ProcessedMessage(Base):
    """A task id whose effects have been committed by an idempotent consumer."""

    __tablename__ = "celery_outbox_processed"

    task_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    task_name: Mapped[str] = mapped_column(String(255), nullable=False)
    processed_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, index=True)


#: The Core table, for statements that need no ORM objects (the relay's claim and mark).
outbox_table = cast(Table, OutboxMessage.__table__)


class RelayHeartbeat(Base):
    """When a relay (a sweep in a worker, or ``flask outbox relay``) last ran, per host.

    Nothing publishes the outbox unless one runs, and a stopped relay looks exactly like
    an idle one from the rows alone: this is how status and health checks tell them apart.
    """

    __tablename__ = "celery_outbox_relays"

    #: ``kind@hostname``: one row per kind of relay and host, so the table stays small.
    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    #: ``relay`` (the long-running process) or ``sweep`` (the beat-scheduled task).
    kind: Mapped[str] = mapped_column(String(16), nullable=False)
    last_seen_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)


class WorkerHeartbeat(Base):
    """When a worker process that runs outbox tasks last said it was alive.

    Written by lifecycle tracking in each worker process (``outbox.consumers.lifecycle``): an
    ordered task started by a process that no longer beats will never finish, and its
    key would wait for ever without this.
    """

    __tablename__ = "celery_outbox_workers"

    #: ``node:pid``: Celery's node name and the process id, as ``task_worker`` names it.
    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    last_seen_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)


class RelayListener(Base):
    """A relay loop listening for commits (PostgreSQL), and whether it waits right now.

    A committing enqueue notifies only while one of these rows says ``waiting``: a relay
    busy draining needs no wake-up, and a NOTIFY costs every concurrent writer (see
    ``outbox.postgres.wakeups``). A row belongs to the listening connection's server process,
    named by its pid; the advisory lock that process holds while it listens tells the
    row of a relay that died (a pid alone can be reused), which is then deleted. Unused
    where the database cannot notify.
    """

    __tablename__ = "celery_outbox_listeners"

    pid: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    backend_start: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    #: ``hostname:pid`` of the relay process, for ``outbox status``.
    relay: Mapped[str] = mapped_column(String(255), nullable=False)
    waiting: Mapped[bool] = mapped_column(Boolean, nullable=False)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)


class BrokerIdentity(Base):
    """What the relays last saw of a broker, to notice that it restarted or lost its data.

    ``data_marker`` is a value the relay wrote into the broker: when the broker no longer
    holds it, the broker lost its data (a restart without persistence, a flush, a
    failover to an empty replica) and whatever it held must be published again.
    """

    __tablename__ = "celery_outbox_brokers"

    #: The broker's URL without credentials, e.g. ``redis://127.0.0.1:6379/0``.
    broker: Mapped[str] = mapped_column(String(255), primary_key=True)
    data_marker: Mapped[str] = mapped_column(String(64), nullable=False)
    #: The server's own instance id (Redis ``run_id``), which changes at every restart.
    run_id: Mapped[str | None] = mapped_column(String(64))
    #: The highest check count the broker reported (``BrokerState.epoch``): a broker that
    #: later reports one no higher is an older copy of itself, and lost what came after.
    epoch: Mapped[int | None] = mapped_column(BigInteger)
    checked_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)


class OrderingKey(Base):
    """One ordering key's place in line: the last sequence number handed out, and which
    task holds the key now (``outbox.ordering.keys``).

    Enqueueing an ordered task increments ``last_seq`` under this row's lock, which the
    enqueuing transaction holds until it commits: writers to one key take their numbers
    one after another, in commit order, while writers to other keys never wait.
    """

    __tablename__ = "celery_outbox_keys"

    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    last_seq: Mapped[int] = mapped_column(BigInteger, nullable=False)
    #: The sequence number of the task that holds the key (pending, or published and not
    #: finished); NULL while every task of the key has finished.
    head_seq: Mapped[int | None] = mapped_column(BigInteger)
    #: Since when that task holds the key.
    head_since: Mapped[datetime | None] = mapped_column(UTCDateTime)
    #: When the task holding the key failed or went dead, with ``on_failure = block``:
    #: every later task of the key waits until a person retries or skips it.
    blocked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    blocked_reason: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)

    __table_args__ = (
        # Blocked keys: counted and listed without reading the others.
        Index(
            "ix_celery_outbox_keys_blocked",
            "blocked_at",
            postgresql_where=text("blocked_at IS NOT NULL"),
            sqlite_where=text("blocked_at IS NOT NULL"),
        ),
        # Keys a task holds, oldest first: walked by the relays' key keeper and listed by
        # ``outbox keys``. Led by ``head_since``, NULL for an idle key, so that where
        # the index holds every key (MariaDB, MySQL) the idle ones are skipped too.
        Index(
            "ix_celery_outbox_keys_busy",
            "head_since",
            "key",
            postgresql_where=text("head_seq IS NOT NULL"),
            sqlite_where=text("head_seq IS NOT NULL"),
        ),
        # Keys with every task finished, deleted by the retention cleanup once old.
        Index(
            "ix_celery_outbox_keys_idle",
            "updated_at",
            postgresql_where=text("head_seq IS NULL"),
            sqlite_where=text("head_seq IS NULL"),
        ),
    )


class MaintenanceLease(Base):
    """Which relay runs the outbox-wide maintenance passes, until when
    (``outbox.maintenance.lease``).

    One row per lease (``maintenance:<broker>``). ``expires_at`` is on the database's
    clock: a relay takes the lease when it is its own or has expired, and renews it at
    each pass.
    """

    __tablename__ = "celery_outbox_leases"

    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    #: ``host:pid:random`` of the relay that holds it.
    holder: Mapped[str] = mapped_column(String(255), nullable=False)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    #: When the holder last renewed it (the database's clock).
    renewed_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)


relays_table = cast(Table, RelayHeartbeat.__table__)
workers_table = cast(Table, WorkerHeartbeat.__table__)
listeners_table = cast(Table, RelayListener.__table__)
keys_table = cast(Table, OrderingKey.__table__)
brokers_table = cast(Table, BrokerIdentity.__table__)
leases_table = cast(Table, MaintenanceLease.__table__)


# Readable by every role: a writer's INSERT evaluates the condition with its own rights,
# and whether a relay waits is no secret. A value a crash leaves behind is corrected by
# the next relay that registers (``WakeupGate.forget_gone``).
_waiting_sequence = DDL(  # type: ignore[no-untyped-call]
    f"""
    CREATE SEQUENCE IF NOT EXISTS {WAITING_SEQUENCE} MINVALUE 0 START 0;
    GRANT SELECT ON SEQUENCE {WAITING_SEQUENCE} TO PUBLIC
    """
).execute_if(dialect="postgresql")

# One NOTIFY per INSERT statement, and only while a relay says it waits on LISTEN: the
# condition is the trigger's WHEN, read as the statement ends, once the INSERT holds its
# lock on the table (what the relay's check after announcing relies on). PostgreSQL
# sends the NOTIFY when the inserting transaction commits (merged with identical
# notifications of that transaction), so a rolled-back enqueue wakes nobody, and a NOTIFY
# makes the commit queue behind every other notifying commit: hence the condition.
_notify_function = DDL(  # type: ignore[no-untyped-call]
    f"""
    CREATE OR REPLACE FUNCTION celery_outbox_notify() RETURNS trigger
    LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM pg_notify('{NOTIFY_CHANNEL}', '');
        RETURN NULL;
    END $$
    """
).execute_if(dialect="postgresql")
NOTIFY_TRIGGER = f"""
    CREATE TRIGGER celery_outbox_notify AFTER INSERT ON celery_outbox
    FOR EACH STATEMENT WHEN ({SOME_RELAY_WAITING}) EXECUTE FUNCTION celery_outbox_notify()
    """
_notify_trigger = DDL(NOTIFY_TRIGGER).execute_if(  # type: ignore[no-untyped-call]
    dialect="postgresql"
)
event.listen(outbox_table, "after_create", _waiting_sequence)
event.listen(outbox_table, "after_create", _notify_function)
event.listen(outbox_table, "after_create", _notify_trigger)

#: Taken by whoever changes the listeners' rows and the sequence, for the rest of its
#: transaction: two relays changing their state at once would otherwise each count the
#: other's old state, and the later write could leave the sequence at 0 with a relay
#: waiting. Writers never take it.
LOCK_LISTENERS = "LOCK TABLE celery_outbox_listeners IN SHARE ROW EXCLUSIVE MODE"
#: The sequence set from the listeners' rows, under ``LOCK_LISTENERS``.
COUNT_WAITING = text(
    "SELECT setval(CAST(:sequence AS regclass),"
    " (SELECT count(*) FROM celery_outbox_listeners WHERE waiting), true)"
).bindparams(sequence=WAITING_SEQUENCE)

#: Whether the wake-up trigger is the current one (an earlier version's reads the
#: listeners' table in its function, or notifies on every commit).
_CURRENT_TRIGGER = text(
    "SELECT count(*) FROM pg_trigger WHERE tgname = 'celery_outbox_notify'"
    " AND tgrelid = CAST('celery_outbox' AS regclass)"
    " AND strpos(pg_get_triggerdef(oid), :sequence) > 0"
).bindparams(sequence=WAITING_SEQUENCE)


def _current_wakeup(conn: Connection) -> None:
    """Bring an earlier version's wake-up trigger up to date (what migration
    ``outbox_0007`` does), so that ``create_tables`` on an existing database leaves it
    as the models describe."""
    store = known_store(conn.dialect.name)
    if store is None or store.notify_channel is None or conn.execute(_CURRENT_TRIGGER).scalar_one():
        return
    conn.execute(_waiting_sequence)
    conn.execute(_notify_function)
    conn.exec_driver_sql("DROP TRIGGER IF EXISTS celery_outbox_notify ON celery_outbox")
    conn.exec_driver_sql(NOTIFY_TRIGGER)
    conn.exec_driver_sql(LOCK_LISTENERS)
    conn.execute(COUNT_WAITING)


def create_tables(bind: Engine | Connection) -> None:
    """Create the outbox's tables and indexes if they do not exist (idempotent); refuse
    a database server too old for the outbox first."""
    with bind.connect() if isinstance(bind, Engine) else nullcontext(bind) as conn:
        store = known_store(conn.dialect.name)
        if store is not None:
            store.check_server(conn)
    metadata.create_all(bind, checkfirst=True)
    with bind.begin() if isinstance(bind, Engine) else nullcontext(bind) as conn:
        _current_wakeup(conn)
