"""The mixed-faults test's own tasks, enqueued through the outbox beside the example's
traffic, and what became of them.

Three kinds, all on the routed queue (``tests.worker_tasks.ROUTED_QUEUE``), which only a
worker started for it consumes, each effect on an order of its own:

- **routed**: idempotent stock reservations, one order each;
- **replacing**: idempotent notices, several under each of a few ordering keys, each of
  which replaces itself with the task that sends it;
- **plain**: notices under ordering keys, several a key, by a task that is not an
  idempotent consumer and is acknowledged on receipt.

Every tenth transaction rolls back, as in ``tests.chaos.checks``.

What the test claims: every idempotent effect applied once; every key either idle with
its tasks' effects in commit order, or blocked with a reason (reported by
``active_keys(blocked_only=True)`` and ``collect_stats().blocked_keys``), none left busy
without a word. A plain task whose worker was killed while it ran may or may not have
applied its notice, and its key is blocked as stuck; only a person retrying it could
apply a notice twice, so applied-twice is counted, not asserted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from celery import Celery
from sqlalchemy import Engine, and_, func, select
from sqlalchemy.orm import Session

from outbox import TaskOutbox, active_keys, collect_stats, outbox_table
from outbox.clock import utcnow
from outbox.data.schema import keys_table
from tests.chaos.checks import ROLLBACK_EVERY, Orders, create_orders
from tests.chaos.processes import pause
from tests.worker_tasks import notify_by_replacement, notify_on_receipt, reserve_routed
from webapp.models import Notification, StockReservation

#: Transactions; each enqueues two routed tasks, one replacing and one plain.
ROUNDS = 100
ROUTED_PER_ROUND = 2
#: Keys of each ordered kind: ROUNDS // KEYS tasks a key, enqueued far apart.
KEYS = 25
#: How long a plain task runs (half before its notice commits, half after), so that a
#: worker killed while busy is likely to be killed in one.
PLAIN_SECONDS = 0.4

_k = keys_table.c
_t = outbox_table.c


@dataclass
class OwnTasks:
    """The orders and keys of the test's own tasks, and what was enqueued under them."""

    routed: Orders = field(default_factory=Orders)
    routed_orders: list[int] = field(default_factory=list)
    #: Each key's order (its notices' ``order_id``).
    order_of: dict[str, int] = field(default_factory=dict)
    #: Each key's events, in the order their transactions committed / rolled back.
    committed: dict[str, list[str]] = field(default_factory=dict)
    rolled_back: dict[str, list[str]] = field(default_factory=dict)

    @classmethod
    def create(cls, engine: Engine) -> OwnTasks:
        """Make every order the tasks will need (committed, pending, never confirmed)."""
        own = cls()
        own.routed_orders = create_orders(engine, ROUNDS * ROUTED_PER_ROUND)
        keyed = create_orders(engine, 2 * KEYS)
        for kind, orders in (("replacing", keyed[:KEYS]), ("plain", keyed[KEYS:])):
            for order_id in orders:
                key = f"chaos-{kind}:{order_id}"
                own.order_of[key] = order_id
                own.committed[key] = []
                own.rolled_back[key] = []
        return own

    @property
    def orders(self) -> set[int]:
        return {*self.routed_orders, *self.order_of.values()}

    def keys(self, kind: str) -> list[str]:
        return [key for key in self.order_of if key.startswith(f"chaos-{kind}:")]

    def enqueue(self, engine: Engine, celery_app: Celery, gap: Callable[[], float]) -> None:
        """Enqueue every round, one transaction each, ``gap()`` seconds apart (the pace of
        the traffic, so that the faults find the routed worker at work)."""
        tasks = TaskOutbox(celery_app)
        replacing, plain = self.keys("replacing"), self.keys("plain")
        for number in range(ROUNDS):
            routed = self.routed_orders[number * ROUTED_PER_ROUND : (number + 1) * ROUTED_PER_ROUND]
            keyed = {
                replacing[number % KEYS]: f"r{number // KEYS}",
                plain[number % KEYS]: f"p{number // KEYS}",
            }
            with Session(engine) as session:
                for order_id in routed:
                    tasks.apply_async(reserve_routed, (order_id,), session=session)
                # Ordered tasks last, just before the commit (TaskOutbox.apply_async).
                for key, event in keyed.items():
                    order_id = self.order_of[key]
                    if key in replacing:
                        args: tuple[Any, ...] = (order_id, event)
                        task: Any = notify_by_replacement
                    else:
                        args, task = (order_id, event, PLAIN_SECONDS), notify_on_receipt
                    tasks.apply_async(task, args, session=session, ordering_key=key)
                if number % ROLLBACK_EVERY == ROLLBACK_EVERY - 1:
                    session.rollback()
                    self.routed.rolled_back.extend(routed)
                    for key, event in keyed.items():
                        self.rolled_back[key].append(event)
                else:
                    session.commit()
                    self.routed.committed.extend(routed)
                    for key, event in keyed.items():
                        self.committed[key].append(event)
            pause(gap())


@dataclass(frozen=True)
class KeyOutcome:
    """One key at the end: its state, and the notices applied under it."""

    key: str
    #: "idle", "blocked" or "busy" (a task holds it and nothing says why it waits).
    state: str
    reason: str | None
    #: The notices' events, in the order they were applied.
    applied: list[str]
    committed: list[str]
    rolled_back: list[str]
    #: The task holding a busy key, as its outbox row shows it.
    head: dict[str, Any] | None = None

    @property
    def firsts(self) -> list[str]:
        return list(dict.fromkeys(self.applied))

    @property
    def twice(self) -> int:
        return len(self.applied) - len(self.firsts)

    @property
    def missing(self) -> int:
        return len(set(self.committed) - set(self.applied))

    @property
    def phantom(self) -> int:
        return len(set(self.rolled_back) & set(self.applied))

    @property
    def in_commit_order(self) -> bool:
        """Idle: every committed notice, in commit order; blocked: a first part of them."""
        if self.state == "idle":
            return self.firsts == self.committed
        return self.firsts == self.committed[: len(self.firsts)]


def key_outcomes(engine: Engine, own: OwnTasks) -> dict[str, KeyOutcome]:
    keys = list(own.order_of)
    with engine.connect() as conn:
        states = {
            row.key: row
            for row in conn.execute(
                select(_k.key, _k.head_seq, _k.blocked_at, _k.blocked_reason).where(
                    _k.key.in_(keys)
                )
            )
        }
        heads = {
            row.ordering_key: dict(row._mapping)
            for row in conn.execute(
                select(
                    _t.ordering_key,
                    _t.ordering_seq,
                    _t.task_name,
                    _t.status,
                    _t.task_state,
                    _t.task_worker,
                    _t.deliveries,
                    _t.published_queue,
                    _t.last_error,
                )
                .select_from(
                    outbox_table.join(
                        keys_table,
                        and_(_t.ordering_key == _k.key, _t.ordering_seq == _k.head_seq),
                    )
                )
                .where(_k.key.in_(keys), _k.blocked_at.is_(None))
            )
        }
        by_order: dict[int, list[str]] = {}
        notices = (
            select(Notification.order_id, Notification.event)
            .where(Notification.order_id.in_(list(own.order_of.values())))
            .order_by(Notification.id)
        )
        for order_id, event in conn.execute(notices):
            by_order.setdefault(order_id, []).append(event)
    outcomes = {}
    for key in keys:
        row = states.get(key)
        if row is None or row.head_seq is None:  # never committed a task, or all done
            state, reason = "idle", None
        elif row.blocked_at is not None:
            state, reason = "blocked", row.blocked_reason
        else:
            state, reason = "busy", None
        outcomes[key] = KeyOutcome(
            key=key,
            state=state,
            reason=reason,
            applied=by_order.get(own.order_of[key], []),
            committed=own.committed[key],
            rolled_back=own.rolled_back[key],
            head=heads.get(key) if state == "busy" else None,
        )
    return outcomes


def routed_tally(engine: Engine, own: OwnTasks) -> dict[str, int]:
    """Lost, phantom and duplicate reservations of the routed tasks' orders."""
    query = (
        select(StockReservation.order_id, func.count())
        .where(StockReservation.order_id.in_(own.routed_orders))
        .group_by(StockReservation.order_id)
    )
    with Session(engine) as session:
        effects: dict[int, int] = dict(session.execute(query).all())
    return {
        "lost": len(set(own.routed.committed) - set(effects)),
        "phantom": len(set(own.routed.rolled_back) & set(effects)),
        "duplicate_effects": sum(count - 1 for count in effects.values() if count > 1),
    }


def settled(engine: Engine, own: OwnTasks) -> bool:
    """Every routed and replacing effect applied, and no key of ours busy."""
    if routed_tally(engine, own)["lost"]:
        return False
    outcomes = key_outcomes(engine, own)
    return not any(o.state == "busy" for o in outcomes.values()) and not any(
        o.missing for key, o in outcomes.items() if key in own.keys("replacing")
    )


def reported_blocked_keys(engine: Engine) -> tuple[set[str], int]:
    """The keys ``active_keys(blocked_only=True)`` lists, and ``blocked_keys`` of the
    stats that status, /healthz, /metrics and the dashboard show."""
    with engine.connect() as conn:
        listed = {state.key for state in active_keys(conn, blocked_only=True, limit=10_000)}
        stats = collect_stats(conn, utcnow())
    return listed, stats.blocked_keys
