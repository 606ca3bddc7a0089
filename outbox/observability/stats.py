"""A snapshot of the outbox's health, for the CLI, the dashboard and monitoring.

Every figure is read through an index, so a probe costs the same beside ten rows or ten
million: pending and dead rows, and blocked ordering keys, through their partial
indexes (their number is the backlog and the dead letters, never the history), the
oldest due row from the first entry of the claim index, the last minute's dispatches
from the newest end of the dispatched-at index. The dispatched rows, which are most of
the table, are not counted: their number is the database's estimate of the table's size
minus the rest, labelled as an estimate wherever it is shown. Nor are the rows held
behind their ordering key, a backlog as large as the keys' lines: ``flask outbox keys``
counts them per key.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.engine import Connection, Engine

from outbox.data import store_for
from outbox.data.schema import OutboxStatus, outbox_table
from outbox.maintenance.heartbeat import RelayRun, relays_seen
from outbox.ordering.keys import blocked_summary
from outbox.postgres.slot import CdcSlot, SlotState

_t = outbox_table.c


@dataclass(frozen=True, slots=True)
class OutboxStats:
    """Row counts per status, how far the relay is behind, and when a relay last ran."""

    pending: int
    #: Pending rows whose time has come (``available_at <= now``); the rest wait for
    #: their ``countdown`` or ``eta``.
    due: int
    dead: int
    #: Seconds since the oldest due pending row became due, ``None`` when none is due.
    #: Measured from ``available_at`` rather than ``created_at`` so a task delayed by an
    #: hour on purpose does not look like an hour of relay lag.
    oldest_pending_age_seconds: float | None
    #: About how many dispatched rows the table holds (with the rows held behind their
    #: ordering key, which ``flask outbox keys`` counts per key): an estimate, never a
    #: count.
    dispatched_estimate: int = 0
    #: Pending and dead rows per task name, e.g. ``{"orders.notify": {"pending": 3}}``.
    by_task: dict[str, dict[str, int]] = field(default_factory=dict)
    #: Rows dispatched in the minute before ``now``: the relay's current rate.
    dispatched_last_minute: int = 0
    #: Seconds since any relay or sweep last ran; ``None`` if none ever has.
    last_relay_run_seconds_ago: float | None = None
    #: Each relay that has run, latest first.
    relays: list[RelayRun] = field(default_factory=list)
    #: Ordering keys stopped at a task that failed for good or went dead
    #: (``flask outbox keys --blocked``), and seconds since the oldest of them stopped.
    blocked_keys: int = 0
    oldest_blocked_age_seconds: float | None = None
    #: The CDC relay's replication slot (PostgreSQL), ``None`` where there is none.
    cdc_slot: SlotState | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def collect_stats(bind: Engine | Connection, now: datetime) -> OutboxStats:
    """Read the snapshot with a handful of indexed queries (see the module docstring)."""
    due = (_t.status == OutboxStatus.PENDING) & (_t.available_at <= now)
    with bind.connect() if isinstance(bind, Engine) else nullcontext(bind) as conn:
        by_task: dict[str, dict[str, int]] = {}
        for status in (OutboxStatus.PENDING, OutboxStatus.DEAD):
            per_task = (
                select(_t.task_name, func.count()).where(_t.status == status).group_by(_t.task_name)
            )
            for name, count in conn.execute(per_task):
                by_task.setdefault(name, {})[str(status)] = count
        oldest = conn.execute(select(func.min(_t.available_at)).where(due)).scalar_one_or_none()
        due_count = conn.execute(select(func.count()).where(due)).scalar_one()
        dispatched_last_minute = conn.execute(
            select(func.count()).where(
                _t.status == OutboxStatus.DISPATCHED, _t.dispatched_at > now - timedelta(minutes=1)
            )
        ).scalar_one()
        store = store_for(conn)
        rows = store.estimated_rows(conn, outbox_table)
        relays = relays_seen(conn, now)
        blocked_keys, oldest_blocked = blocked_summary(conn, now)
        cdc_slot = None
        if store.streams_changes:
            state = CdcSlot(conn.engine).state(conn)
            cdc_slot = state if state.exists else None
    pending = sum(counts.get(OutboxStatus.PENDING, 0) for counts in by_task.values())
    dead = sum(counts.get(OutboxStatus.DEAD, 0) for counts in by_task.values())
    return OutboxStats(
        pending=pending,
        due=due_count,
        dead=dead,
        oldest_pending_age_seconds=(
            None if oldest is None else max(0.0, (now - oldest).total_seconds())
        ),
        dispatched_estimate=max(0, rows - pending - dead),
        by_task=by_task,
        dispatched_last_minute=dispatched_last_minute,
        last_relay_run_seconds_ago=(
            min(relay.last_seen_seconds_ago for relay in relays) if relays else None
        ),
        relays=relays,
        blocked_keys=blocked_keys,
        oldest_blocked_age_seconds=oldest_blocked,
        cdc_slot=cdc_slot,
    )
