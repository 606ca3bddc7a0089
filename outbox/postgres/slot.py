"""The logical replication slot and publication the change-data-capture relay reads.

A slot is PostgreSQL's promise to keep the write-ahead log from the position its reader
last confirmed: the CDC relay (``outbox.relays.cdc``) confirms a transaction only once
its tasks are on the broker, so a relay killed anywhere starts again from there. The
price of the promise is WAL kept on disk while nobody reads the slot, which is why the
slot's lag is reported (``outbox status``, ``/metrics``, ``/healthz``) and why a server
should cap it with ``max_slot_wal_keep_size``: past the cap, PostgreSQL invalidates the
slot instead of filling its disk, and the relay falls back to polling (the rows are
still in the table, pending, so nothing is lost).

The publication covers the outbox table's INSERTs only: the relay's own UPDATEs
(marking rows dispatched) and the cleanup's DELETEs are never decoded for it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError

from outbox.data import store_for
from outbox.data.schema import outbox_table
from outbox.errors import CdcSetupError

DEFAULT_SLOT = "celery_outbox"
DEFAULT_PUBLICATION = "celery_outbox"

_SLOT = text(
    "SELECT s.active, s.active_pid, s.wal_status, s.safe_wal_size,"
    # A standby has no current WAL position of its own to measure from.
    " CASE WHEN NOT pg_is_in_recovery() THEN"
    " pg_wal_lsn_diff(pg_current_wal_lsn(), s.confirmed_flush_lsn) END AS lag_bytes,"
    " EXTRACT(epoch FROM r.flush_lag) AS flush_lag, s.confirmed_flush_lsn::text AS confirmed"
    " FROM pg_replication_slots s LEFT JOIN pg_stat_replication r ON r.pid = s.active_pid"
    " WHERE s.slot_name = :slot AND s.database = current_database()"
)


@dataclass(frozen=True, slots=True)
class SlotState:
    """What PostgreSQL says of the slot."""

    name: str
    exists: bool
    #: A relay streams from it now.
    active: bool = False
    #: The WAL the server keeps for it beyond what it confirmed, in bytes.
    lag_bytes: int | None = None
    #: Seconds between WAL being written and the relay confirming it, as the server
    #: measured it last (``pg_stat_replication.flush_lag``); 0 once caught up and idle,
    #: ``None`` with no relay streaming.
    lag_seconds: float | None = None
    #: ``reserved``, ``extended``, ``unreserved`` or ``lost`` (invalidated).
    wal_status: str | None = None
    #: Bytes of WAL that may still be written before the slot is invalidated (with
    #: ``max_slot_wal_keep_size`` set).
    safe_wal_size: int | None = None
    #: The position it confirmed, as PostgreSQL writes it.
    confirmed: str | None = None

    @property
    def invalidated(self) -> bool:
        return self.wal_status == "lost"


class CdcSlot:
    """The slot and publication of one outbox, by name."""

    def __init__(
        self, engine: Engine, slot: str = DEFAULT_SLOT, publication: str = DEFAULT_PUBLICATION
    ) -> None:
        for what, name in (("slot", slot), ("publication", publication)):
            if not name.replace("_", "").isalnum() or not name.islower() or name[0].isdigit():
                raise ValueError(
                    f"{what} name {name!r}: use lower-case letters, digits and underscores"
                )
        self.engine = engine
        self.slot = slot
        self.publication = publication

    def setup_sql(self, role: str = "<the relay's role>") -> str:
        """What a superuser runs once to let ``role`` stream the outbox's changes."""
        return (
            f"ALTER ROLE {role} WITH REPLICATION;\n"
            f"CREATE PUBLICATION {self.publication} FOR TABLE {outbox_table.name}"
            " WITH (publish = 'insert');\n"
            f"SELECT pg_create_logical_replication_slot('{self.slot}', 'pgoutput');"
        )

    def ensure(self) -> bool:
        """Create the publication and the slot if they do not exist; whether anything was
        created. Refuses, with the SQL to run, a server or role that cannot."""
        with self.engine.connect() as conn:
            if not store_for(conn).streams_changes:
                raise CdcSetupError(
                    f"the CDC relay reads PostgreSQL's write-ahead log; the outbox is on "
                    f"{conn.dialect.name}. Use `outbox relay` (polling) instead."
                )
            level = conn.exec_driver_sql("SHOW wal_level").scalar_one()
            if level != "logical":
                raise CdcSetupError(
                    f"wal_level is {level!r}: logical decoding needs 'logical'. As a "
                    "superuser: ALTER SYSTEM SET wal_level = logical; then restart the "
                    "server."
                )
            role = conn.exec_driver_sql("SELECT current_user").scalar_one()
            conn.rollback()
            created = False
            try:
                with conn.begin():
                    if not self._has_publication(conn):
                        conn.exec_driver_sql(
                            f"CREATE PUBLICATION {self.publication} FOR TABLE "
                            f"{outbox_table.name} WITH (publish = 'insert')"
                        )
                        created = True
                with conn.begin():
                    if not self.state(conn).exists:
                        conn.execute(
                            text("SELECT pg_create_logical_replication_slot(:slot, 'pgoutput')"),
                            {"slot": self.slot},
                        )
                        created = True
            except DBAPIError as e:
                if getattr(e.orig, "sqlstate", None) != "42501":  # insufficient_privilege
                    raise
                raise CdcSetupError(
                    f"role {role!r} may not create the CDC relay's publication or slot "
                    f"({e.orig}). As a superuser, run:\n{self.setup_sql(role)}"
                ) from e
            return created

    def state(self, conn: Connection | None = None) -> SlotState:
        if conn is None:
            with self.engine.connect() as own:
                return self.state(own)
        row = conn.execute(_SLOT, {"slot": self.slot}).first()
        if row is None:
            return SlotState(self.slot, exists=False)
        return SlotState(
            self.slot,
            exists=True,
            active=bool(row.active),
            lag_bytes=None if row.lag_bytes is None else int(row.lag_bytes),
            lag_seconds=(None if not row.active else float(row.flush_lag or 0.0)),
            wal_status=row.wal_status,
            safe_wal_size=None if row.safe_wal_size is None else int(row.safe_wal_size),
            confirmed=row.confirmed,
        )

    def drop(self) -> bool:
        """Drop the slot (ending a relay that streams from it) and the publication;
        whether the slot existed. The WAL it kept is released."""
        with self.engine.connect() as conn:
            state = self.state(conn)
            conn.rollback()
            with conn.begin():
                conn.execute(
                    text(
                        "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots"
                        " WHERE slot_name = :slot AND active"
                    ),
                    {"slot": self.slot},
                )
            if state.exists:
                _drop_when_released(conn, self.slot)
            with conn.begin():
                conn.exec_driver_sql(f"DROP PUBLICATION IF EXISTS {self.publication}")
            return state.exists

    def _has_publication(self, conn: Connection) -> bool:
        found = conn.execute(
            text("SELECT 1 FROM pg_publication WHERE pubname = :name"),
            {"name": self.publication},
        ).first()
        return found is not None


def _drop_when_released(conn: Connection, slot: str, attempts: int = 100) -> None:
    """Drop ``slot`` once the process that streamed from it has ended (a terminated
    walsender takes a moment to release it)."""
    drop = text("SELECT pg_drop_replication_slot(:slot)")
    for attempt in range(attempts):
        try:
            with conn.begin():
                conn.execute(drop, {"slot": slot})
        except DBAPIError as e:
            # object_in_use: still held by the ending walsender.
            if getattr(e.orig, "sqlstate", None) != "55006" or attempt == attempts - 1:
                raise
            time.sleep(0.05)
        else:
            return
