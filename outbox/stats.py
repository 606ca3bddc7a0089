"""A snapshot of the outbox's health, for the CLI and monitoring."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.engine import Connection, Engine

from outbox.schema import OutboxStatus, outbox_table

_t = outbox_table.c


@dataclass(frozen=True, slots=True)
class OutboxStats:
    """Row counts per status and how far the relay is behind."""

    pending: int
    #: Pending rows whose time has come (``available_at <= now``); the rest wait for
    #: their ``countdown`` or ``eta``.
    due: int
    dispatched: int
    dead: int
    #: Seconds since the oldest due pending row became due, ``None`` when none is due.
    #: Measured from ``available_at`` rather than ``created_at`` so a task delayed by an
    #: hour on purpose does not look like an hour of relay lag.
    oldest_pending_age_seconds: float | None
    #: Rows per task name and status, e.g. ``{"orders.notify": {"dispatched": 3}}``.
    by_task: dict[str, dict[str, int]] = field(default_factory=dict)
    #: Rows dispatched in the minute before ``now``: the relay's current rate.
    dispatched_last_minute: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def collect_stats(bind: Engine | Connection, now: datetime) -> OutboxStats:
    """Count rows per task and status with one grouped query, plus indexed lookups."""
    oldest_query = select(func.min(_t.available_at)).where(
        _t.status == OutboxStatus.PENDING, _t.available_at <= now
    )
    due_query = select(func.count()).where(
        _t.status == OutboxStatus.PENDING, _t.available_at <= now
    )
    by_task_query = select(_t.task_name, _t.status, func.count()).group_by(_t.task_name, _t.status)
    rate_query = select(func.count()).where(
        _t.status == OutboxStatus.DISPATCHED, _t.dispatched_at > now - timedelta(minutes=1)
    )
    with bind.connect() if isinstance(bind, Engine) else nullcontext(bind) as conn:
        by_task: dict[str, dict[str, int]] = {}
        for name, status, count in conn.execute(by_task_query):
            by_task.setdefault(name, {})[str(OutboxStatus(status))] = count
        oldest = conn.execute(oldest_query).scalar_one_or_none()
        due = conn.execute(due_query).scalar_one()
        dispatched_last_minute = conn.execute(rate_query).scalar_one()
    counts = {
        status: sum(per_status.get(str(status), 0) for per_status in by_task.values())
        for status in OutboxStatus
    }
    return OutboxStats(
        pending=counts.get(OutboxStatus.PENDING, 0),
        due=due,
        dispatched=counts.get(OutboxStatus.DISPATCHED, 0),
        dead=counts.get(OutboxStatus.DEAD, 0),
        oldest_pending_age_seconds=(
            None if oldest is None else max(0.0, (now - oldest).total_seconds())
        ),
        by_task=by_task,
        dispatched_last_minute=dispatched_last_minute,
    )
