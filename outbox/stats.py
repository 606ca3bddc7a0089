"""A snapshot of the outbox's health, for the CLI and monitoring."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import asdict, dataclass
from datetime import datetime
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

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def collect_stats(bind: Engine | Connection, now: datetime) -> OutboxStats:
    """Count rows per status with one grouped query and one indexed lookup."""
    counts_query = select(_t.status, func.count()).group_by(_t.status)
    oldest_query = select(func.min(_t.available_at)).where(
        _t.status == OutboxStatus.PENDING, _t.available_at <= now
    )
    due_query = select(func.count()).where(
        _t.status == OutboxStatus.PENDING, _t.available_at <= now
    )
    with bind.connect() if isinstance(bind, Engine) else nullcontext(bind) as conn:
        counts = {OutboxStatus(status): count for status, count in conn.execute(counts_query)}
        oldest = conn.execute(oldest_query).scalar_one_or_none()
        due = conn.execute(due_query).scalar_one()
    return OutboxStats(
        pending=counts.get(OutboxStatus.PENDING, 0),
        due=due,
        dispatched=counts.get(OutboxStatus.DISPATCHED, 0),
        dead=counts.get(OutboxStatus.DEAD, 0),
        oldest_pending_age_seconds=(
            None if oldest is None else max(0.0, (now - oldest).total_seconds())
        ),
    )
