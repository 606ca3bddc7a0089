"""When a dispatched task counts as confirmed, when it is presumed lost, and what then.

A task whose consumer is idempotent (:func:`outbox.idempotent`) is *confirmed* once its
id is in ``celery_outbox_processed``: the consumer committed its effects, or recorded
that the task failed on its own. Until then its row carries a ``confirm_deadline``, and
the outbox watches for the ways a published message disappears without running:

1. **The broker lost its data.** Redis restarted without persistence, was flushed, or
   failed over to an empty replica. The relays keep a marker in the broker and the
   broker's instance id in ``celery_outbox_brokers``; when the marker is gone, every
   unconfirmed task published before the loss is published again at once. Redis may
   also lose only its latest writes (restored from an older copy, a lagging replica
   promoted, a restart before its AOF was synced): each check advances a counter in the
   broker (its epoch) with the check's time, so a broker whose epoch went back, or that
   restarted, tells when its data ends, and the unconfirmed tasks dispatched since then
   that it does not hold are published again.
2. **The broker lost one message.** kombu's Redis transport pops a message and records
   it as unacknowledged in two steps; a worker killed in between takes it along. For
   tasks acknowledged late (``acks_late``: the message stays on the broker until the
   task has finished), a task that is neither queued nor held by a worker, at two
   checks a few seconds apart, and not confirmed, is lost: it is published again.
3. **Nothing is heard of it.** Whatever the broker, a task is published again once
   ``confirm_timeout`` has passed since its *last sign of life*: its dispatch, a
   recorded start or retry (``outbox.consumers.lifecycle``; a retry counts until its countdown is
   due), or the broker still holding its message.

Publishing again is safe because the id stays the same and the consumer skips an id it
has already processed. ``deliveries`` counts the publishes. A task published
``max_deliveries`` times without a confirmation is marked ``dead`` (the consumer keeps
failing to record it, e.g. it kills its worker each time) and comes back to life as
dispatched if its record appears after all. Failed publish *attempts* are counted
apart, by the relay, and never make a row dead for lack of confirmation.

Every change is made in bounded batches, each its own short transaction, so that an
outage that left a million rows overdue is worked off in steps rather than in one
statement that locks them all.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable
from dataclasses import dataclass, fields
from datetime import datetime, timedelta
from typing import Any, cast

from celery import Celery
from kombu import Queue
from sqlalchemy import ColumnElement, FromClause, Select, Table, exists, select, update
from sqlalchemy.engine import Connection, Engine

from outbox.clock import Clock, utcnow
from outbox.data import Store
from outbox.data.schema import (
    OutboxStatus,
    ProcessedMessage,
    brokers_table,
    keys_table,
    outbox_table,
)
from outbox.ordering.handover import Place, finish
from outbox.settings import OutboxSettings
from outbox.transports import BrokerProbe, BrokerState

logger = logging.getLogger(__name__)

_t = outbox_table.c
_k = keys_table.c
_processed = cast(Table, ProcessedMessage.__table__).c

#: Rows examined or changed per statement, each statement its own transaction.
BATCH_ROWS = 1000
#: Batches of overdue rows one run works off at most; the next run goes on.
MAX_BATCHES_PER_RUN = 10
#: A task is looked for on the broker only once it was dispatched this long ago
#: (seconds): younger ones are normally confirmed before anything is worth checking.
LOST_AFTER = 10.0
#: Slack around a broker restart's moment, which Redis reports in whole seconds.
RESTART_SLACK = timedelta(seconds=2)
#: Busy keys whose task the lost-message check looks at, the longest busy first: a
#: window, so that the check costs the same however many keys are busy.
OLDEST_KEYS = 100
#: Least time between the two checks that find a task's message gone: a message a worker
#: is taking (popped, not yet recorded as unacknowledged) is gone for a moment.
ABSENT_TWICE_GAP = timedelta(seconds=2)


@dataclass(frozen=True, slots=True)
class ConfirmationResult:
    """What one confirmation run did, in rows."""

    #: Dispatched rows whose consumer's record was found: no longer watched.
    confirmed: int = 0
    #: Rows dead for lack of confirmation whose record has appeared since: dispatched.
    revived: int = 0
    #: Overdue rows with a recent sign of life, given until it plus ``confirm_timeout``.
    extended: int = 0
    #: Rows put back to pending, to be published again under their ids.
    republished: int = 0
    #: Rows that reached ``max_deliveries`` unconfirmed publishes: now dead.
    dead: int = 0
    #: Rows whose ``expires`` passed unconfirmed: a worker discards them, so no consumer
    #: will ever confirm them; no longer watched.
    expired: int = 0
    #: The broker was found to have lost its data in this run.
    broker_data_lost: bool = False

    def __add__(self, other: ConfirmationResult) -> ConfirmationResult:
        return ConfirmationResult(
            **{
                f.name: (getattr(self, f.name) or getattr(other, f.name))
                if f.name == "broker_data_lost"
                else getattr(self, f.name) + getattr(other, f.name)
                for f in fields(self)
            }
        )


@dataclass(frozen=True, slots=True)
class _Watched:
    """An unconfirmed row, as the checks need it."""

    id: int
    task_id: str
    task_name: str
    options: Any
    status: str
    deliveries: int
    dispatched_at: datetime | None
    task_started_at: datetime | None
    task_finished_at: datetime | None
    task_retry_eta: datetime | None
    #: Where the relay published it (``None`` for rows published before it recorded).
    published_queue: str | None
    published_exchange: str | None
    ordering_key: str | None
    ordering_seq: int | None
    #: Awaiting its consumer's confirmation (an idempotent consumer's task).
    watched: bool


class Confirmation:
    """Runs the checks above; :meth:`run_once` is one pass, called by the relays."""

    def __init__(
        self,
        engine: Engine,
        celery_app: Celery,
        settings: OutboxSettings,
        *,
        store: Store,
        probe: BrokerProbe,
        clock: Clock = utcnow,
    ) -> None:
        self.engine = engine
        self.celery_app = celery_app
        self.settings = settings
        self.store = store
        self.probe = probe
        self._clock = clock
        self._timeout = timedelta(seconds=settings.confirm_timeout)
        # Task ids that were neither queued nor held by a worker at the previous check,
        # and when that check was.
        self._absent: set[str] = set()
        self._absent_checked_at: datetime | None = None

    def run_once(self) -> ConfirmationResult:
        """Settle confirmed rows, then look for lost data, lost messages, silent tasks."""
        now = self._clock()
        result = self._settle(now)
        result += self._recover_lost_broker_data(now)
        result += self._republish_lost_messages(now)
        result += self._handle_overdue(now)
        return result

    # -- confirmed ----------------------------------------------------------------

    def _processed(self) -> ColumnElement[bool]:
        return exists().where(self.store.processed_id_matches(_processed.task_id, _t.task_id))

    def _settle(self, now: datetime) -> ConfirmationResult:
        processed = self._processed()
        revived = self._update_in_batches(
            select(_t.id).where(
                _t.status == OutboxStatus.DEAD, _t.confirm_deadline.is_not(None), processed
            ),
            status=OutboxStatus.DISPATCHED,
            confirm_deadline=None,
            last_error="confirmed by its consumer after it was marked dead",
        )
        confirmed = self._update_in_batches(
            select(_t.id).where(
                _t.status == OutboxStatus.DISPATCHED, _t.confirm_deadline <= now, processed
            ),
            confirm_deadline=None,
        )
        if revived:
            logger.warning("%d dead task(s) were confirmed by their consumer: dispatched", revived)
        return ConfirmationResult(confirmed=confirmed, revived=revived)

    # -- 1. the broker lost its data -----------------------------------------------

    def _recover_lost_broker_data(self, now: datetime) -> ConfirmationResult:
        b = brokers_table.c
        with self.engine.connect() as conn:
            known = conn.execute(
                select(b.data_marker, b.run_id, b.epoch).where(b.broker == self.probe.name)
            ).one_or_none()
        try:
            state = (
                self.probe.state(known.data_marker, known.run_id)
                if known is not None
                else self.probe.state()
            )
        except Exception as e:  # an unreachable broker has nothing to tell; the relay says so
            logger.debug("cannot read the broker's identity: %s", e)
            return ConfirmationResult()
        if state is None:
            return ConfirmationResult()
        if known is None:
            self._remember(state, now)
            return ConfirmationResult()
        if known.data_marker == state.data_marker:
            return self._recover_lost_writes(known.run_id, known.epoch, state, now)
        restarted = known.run_id != state.run_id and state.started_at is not None
        lost_at = state.started_at if restarted and state.started_at is not None else now
        how = f"restarted at {lost_at:%H:%M:%S} without it" if restarted else "its marker vanished"
        republished = self._update_in_batches(
            select(_t.id).where(
                _t.status == OutboxStatus.DISPATCHED,
                _t.confirm_deadline.is_not(None),
                _t.dispatched_at < lost_at + RESTART_SLACK,
                ~self._processed(),
            ),
            **self._republish_values(now, f"the broker lost its data ({how})"),
        )
        self._remember(state, now)
        logger.warning(
            "broker %s lost its data (%s): %d unconfirmed task(s) published again",
            state.broker,
            how,
            republished,
        )
        return ConfirmationResult(republished=republished, broker_data_lost=True)

    def _recover_lost_writes(
        self, known_run_id: str | None, known_epoch: int | None, state: BrokerState, now: datetime
    ) -> ConfirmationResult:
        """The broker kept its marker: look for what it was given after the last check
        its data remembers, if that data may be older than what it acknowledged.

        - Its epoch is no higher than one recorded before: the data is an older copy (a
          snapshot or backup restored, a lagging replica promoted), and whatever came after
          the copy's last check is gone. Every relay's check advances the epoch before it
          records it, so the broker's only ever exceeds the recorded one while its data
          goes on, however many relays check at once.
        - It restarted (a new instance) with its epoch going on: its data holds the last
          check, but writes after that check may still be missing where persistence or
          replication lags behind (an AOF synced every second, an RDB snapshot, an
          asynchronous replica).

        Either way, the tasks dispatched since that check and not held by the broker are
        published again (the consumer skips one it has processed); a restart that kept
        every write holds them all, and nothing is published."""
        set_back = (
            known_epoch is not None and state.epoch is not None and state.epoch <= known_epoch
        )
        restarted = known_run_id != state.run_id
        if not set_back and not restarted:
            self._remember_epoch(state, now)
            return ConfirmationResult()
        if not set_back and state.previous_check_at is None:
            # A broker that remembers no check: a restart loses nothing it acknowledged.
            logger.info("broker %s restarted (run_id %s) with its data", state.broker, state.run_id)
            self._remember(state, now)
            return ConfirmationResult()
        since = state.previous_check_at
        as_of = "an unknown moment" if since is None else f"{since:%H:%M:%S}"
        held_epoch = (state.epoch or 1) - 1  # what the broker held before this check
        how = (
            f"was restored from a copy of its data as of {as_of} (its epoch went back to "
            f"{held_epoch} from {known_epoch})"
            if set_back
            else f"restarted (run_id {state.run_id}) with its data as of {as_of}"
        )
        republished = self._republish_unheld_since(
            since, now, f"not held by the broker after it {how}"
        )
        self._remember(state, now)
        log = logger.warning if set_back or republished else logger.info
        log(
            "broker %s %s: unconfirmed tasks dispatched since and not held: %d published again",
            state.broker,
            how,
            republished,
        )
        return ConfirmationResult(republished=republished, broker_data_lost=set_back)

    def _republish_unheld_since(self, since: datetime | None, now: datetime, reason: str) -> int:
        """Publish again the unconfirmed tasks dispatched since ``since`` (all of them if
        ``None``) whose messages the broker does not hold.

        ``since`` is by the clock of the relay that checked, a task's dispatch by its own
        relay's: the slack covers clocks a little apart. Up to ``BATCH_ROWS`` such tasks
        are looked for on the broker; beyond that, or when the broker cannot tell, every
        one is published again, and so is one published to an exchange without a queue
        of its own (a duplicate costs its consumer a lookup, a lost task an hour)."""
        window = [_t.status == OutboxStatus.DISPATCHED, _t.confirm_deadline.is_not(None)]
        if since is not None:
            window.append(_t.dispatched_at >= since - RESTART_SLACK)
        with self.engine.connect() as conn:
            rows = self._watched(conn, *window)
        if not rows:
            return 0
        queues = {row.task_id: queue for row in rows if (queue := self._queue_of(row))}
        held = self._held_in(queues) if len(rows) < BATCH_ROWS else None
        values = self._republish_values(now, reason)
        if held is None:
            ids = select(_t.id).where(*window, ~self._processed())
            return self._update_in_batches(ids, **values)
        unheld = [row.id for row in rows if row.task_id not in held]
        return self._update_ids(unheld, still_unconfirmed=True, **values)

    def _remember(self, state: BrokerState, now: datetime) -> None:
        """Record the broker's identity as it is now, its epoch included (set back, after
        a restore: the relays compare the next checks with the restored data's)."""
        values = {
            "broker": state.broker,
            "data_marker": state.data_marker,
            "run_id": state.run_id,
            "epoch": state.epoch,
            "checked_at": now,
        }
        with self.engine.begin() as conn:
            conn.execute(self.store.upsert(brokers_table, values, ["broker"]))

    def _remember_epoch(self, state: BrokerState, now: datetime) -> None:
        """Record the broker's epoch if no relay recorded a higher one: relays checking
        at once each advance it, and the one that records last must not set it back (the
        loss of what came between the two checks would go unnoticed)."""
        if state.epoch is None:
            return
        b = brokers_table.c
        with self.engine.begin() as conn:
            conn.execute(
                update(brokers_table)
                .where(b.broker == state.broker, b.epoch.is_(None) | (b.epoch < state.epoch))
                .values(epoch=state.epoch, checked_at=now)
            )

    # -- 2. the broker lost one message ---------------------------------------------

    def _republish_lost_messages(self, now: datetime) -> ConfirmationResult:
        if self._absent_checked_at is not None and now - self._absent_checked_at < ABSENT_TWICE_GAP:
            return ConfirmationResult()  # too soon to tell a message in transit from a lost one
        self._absent_checked_at = now
        dispatched_by = now - timedelta(seconds=LOST_AFTER)
        rows = [
            row
            for row in self._unconfirmed(dispatched_by)
            if self._held_until_finished(row.task_name)
        ]
        seen = {row.id for row in rows}
        rows += [row for row in self._unstarted_heads(dispatched_by) if row.id not in seen]
        held = self._held(rows)
        if held is None:
            self._absent.clear()
            return ConfirmationResult()
        absent = {row.task_id for row in rows} - held
        lost = [row for row in rows if row.task_id in absent & self._absent]
        self._absent = absent - {row.task_id for row in lost}
        if not lost:
            return ConfirmationResult()
        expired = [row for row in lost if _expired(row.options, now)]
        lost = [row for row in lost if row not in expired]
        why = "its message was neither queued nor held by a worker at two checks"
        plain = [row for row in lost if not row.watched]
        result = self._give_up_on_expired(expired)
        result += self._give_another_delivery([row for row in lost if row.watched], now, why)
        stuck = self._stop_keys(plain, now, f"stuck: {why}, and it never started")
        logger.warning(
            "%d task(s) lost by the broker (neither queued nor held by a worker, and not "
            "confirmed or started): %d published again, %d dead after %d deliveries, %d "
            "ordering key(s) stuck at a task that is not an idempotent consumer (blocked)",
            len(lost),
            result.republished,
            result.dead,
            self.settings.max_deliveries,
            stuck,
        )
        return result

    def _unstarted_heads(self, dispatched_by: datetime) -> list[_Watched]:
        """Ordered tasks holding their key, dispatched by then and not started: an
        ordered task's start is written as it begins (``outbox.consumers.lifecycle``), so one whose
        message has gone from the broker without a start is lost, idempotent or not."""
        # The keys busy longest (their own index), each to its task by its place: never
        # through the dispatched rows, which are millions, and never more than a window of
        # keys. A key stuck at a lost task stays busy, so it is among the oldest by the
        # time the keys ahead of it have moved on.
        oldest = (
            select(_k.key, _k.head_seq)
            .where(
                _k.head_seq.is_not(None),
                _k.head_since.is_not(None),
                _k.blocked_at.is_(None),
                _k.head_since <= dispatched_by,
            )
            .order_by(_k.head_since)
            .limit(OLDEST_KEYS)
            .subquery()
        )
        with self.engine.connect() as conn:
            return self._watched(
                conn,
                _t.status == OutboxStatus.DISPATCHED,
                _t.task_state.is_(None),
                _t.dispatched_at <= dispatched_by,
                source=oldest.join(
                    outbox_table,
                    (_t.ordering_key == oldest.c.key) & (_t.ordering_seq == oldest.c.head_seq),
                ),
                order_by=_t.id,
            )

    def _stop_keys(self, rows: list[_Watched], now: datetime, why: str) -> int:
        """Block the keys of lost tasks that are not idempotent consumers: one may have
        run in part after all (its start not written), so a person decides (``unblock``)."""
        stopped = 0
        for row in rows:
            if row.ordering_key is None or row.ordering_seq is None:
                continue
            with self.engine.begin() as conn:
                stopped += finish(conn, Place(row.ordering_key, row.ordering_seq), now, error=why)
        return stopped

    def queues_deleted(self, queues: Collection[str], now: datetime) -> ConfirmationResult:
        """The broker no longer has ``queues`` (a relay found out publishing to them):
        publish the unconfirmed tasks dispatched to them again, at once, since whatever
        they held went with them."""
        rows = [row for row in self._unconfirmed(now) if self._queue_of(row) in queues]
        if not rows:
            return ConfirmationResult()
        names = ", ".join(sorted(queues))
        result = self._give_another_delivery(rows, now, f"its queue was deleted ({names})")
        logger.warning(
            "queue(s) %s deleted from the broker: %d unconfirmed task(s) published again, "
            "%d dead after %d deliveries",
            names,
            result.republished,
            result.dead,
            self.settings.max_deliveries,
        )
        return result

    def _held_until_finished(self, task_name: str) -> bool:
        """Whether the broker keeps this task's message until the task has finished."""
        task = self.celery_app.tasks.get(task_name)
        return bool(task is not None and task.acks_late)

    def _held(self, rows: list[_Watched]) -> set[str] | None:
        """Task ids the broker holds for ``rows``' queues; ``None`` when it cannot tell.

        A task published to an exchange without a queue of its own cannot be looked for:
        it counts as held."""
        routed = {row.task_id: self._queue_of(row) for row in rows}
        queues = {task_id: queue for task_id, queue in routed.items() if queue is not None}
        unknown = set(routed) - set(queues)
        if not queues:
            return unknown or None
        held = self._held_in(queues)
        return None if held is None else held | unknown

    def _held_in(self, queues: dict[str, str]) -> set[str] | None:
        try:
            held = self.probe.held_task_ids(set(queues.values()))
            if held is not None:
                return held
            # A broker that cannot list its queues may still tell which are gone: the
            # tasks of the others are held as far as anyone can tell.
            missing = self.probe.missing_queues(set(queues.values()))
        except Exception as e:  # an unreachable broker tells nothing; wait for it
            logger.debug("cannot read what the broker holds: %s", e)
            return None
        if not missing:
            return None
        return {task_id for task_id, queue in queues.items() if queue not in missing}

    def _queue_of(self, row: _Watched) -> str | None:
        """The queue the row's task was published to, as the relay recorded it.

        A row published by an earlier version recorded none: its route is worked out
        from its options and its task's own, without the arguments a router may read."""
        if row.published_queue is not None or row.published_exchange is not None:
            return row.published_queue
        options = row.options if isinstance(row.options, dict) else {}
        task = self.celery_app.tasks.get(row.task_name)
        queue = getattr(task, "queue", None)
        own = {"queue": queue} if queue else {}
        wanted = {key: options[key] for key in ("queue", "routing_key") if key in options}
        wanted = {**own, **wanted}
        try:
            queue = self.celery_app.amqp.router.route(wanted, row.task_name).get("queue")
        except KeyError:  # a queue Celery does not know: the row's own name for it
            queue = wanted.get("queue")
        if isinstance(queue, Queue) and queue.name:
            return str(queue.name)
        return str(queue or self.celery_app.conf.task_default_queue)

    # -- 3. nothing heard of it --------------------------------------------------------

    def _handle_overdue(self, now: datetime) -> ConfirmationResult:
        result = ConfirmationResult()
        for _ in range(MAX_BATCHES_PER_RUN):
            with self.engine.connect() as conn:
                rows = self._watched(conn, _t.confirm_deadline <= now)
            if not rows:
                break
            result += self._judge_overdue(rows, now)
            if len(rows) < BATCH_ROWS:
                break
        if result.republished or result.dead:
            logger.warning(
                "%d dispatched task(s) not confirmed within %gs of their last sign of life: "
                "%d published again, %d dead after %d deliveries",
                result.republished + result.dead,
                self.settings.confirm_timeout,
                result.republished,
                result.dead,
                self.settings.max_deliveries,
            )
        return result

    def _judge_overdue(self, rows: list[_Watched], now: datetime) -> ConfirmationResult:
        later: dict[datetime, list[int]] = {}
        expired: list[_Watched] = []
        silent: list[_Watched] = []
        for row in rows:
            if row.status != OutboxStatus.DISPATCHED:
                # Pending: about to be published again, which sets a new deadline. Dead:
                # waiting for a late confirmation, which _settle looks for.
                later.setdefault(now + self._timeout, []).append(row.id)
            elif (alive_until := _last_sign_of_life(row) + self._timeout) > now:
                later.setdefault(alive_until, []).append(row.id)
            elif _expired(row.options, now):
                expired.append(row)
            else:
                silent.append(row)
        held = self._held(silent) or set()
        # Still queued, or held by a worker: a sign of life too.
        later.setdefault(now + self._timeout, []).extend(
            row.id for row in silent if row.task_id in held
        )
        silent = [row for row in silent if row.task_id not in held]
        result = ConfirmationResult(
            extended=sum(
                self._update_ids(ids, confirm_deadline=deadline) for deadline, ids in later.items()
            )
        )
        result += self._give_up_on_expired(expired)
        if silent:
            reason = (
                f"no consumer recorded this task as processed within "
                f"{self.settings.confirm_timeout:g}s of its last sign of life"
            )
            result += self._give_another_delivery(silent, now, reason)
        return result

    # -- shared ---------------------------------------------------------------------

    def _unconfirmed(self, dispatched_by: datetime) -> list[_Watched]:
        """Dispatched rows awaiting their consumer's confirmation, dispatched by then."""
        with self.engine.connect() as conn:
            return self._watched(
                conn,
                _t.status == OutboxStatus.DISPATCHED,
                _t.confirm_deadline.is_not(None),
                _t.dispatched_at <= dispatched_by,
            )

    def _watched(
        self,
        conn: Connection,
        *where: ColumnElement[bool],
        source: FromClause = outbox_table,
        order_by: ColumnElement[Any] = _t.confirm_deadline,
    ) -> list[_Watched]:
        query: Select[Any] = (
            select(
                _t.id,
                _t.task_id,
                _t.task_name,
                _t.options,
                _t.status,
                _t.deliveries,
                _t.dispatched_at,
                _t.task_started_at,
                _t.task_finished_at,
                _t.task_retry_eta,
                _t.published_queue,
                _t.published_exchange,
                _t.ordering_key,
                _t.ordering_seq,
                _t.confirm_deadline.is_not(None).label("watched"),
            )
            .select_from(source)
            .where(*where, ~self._processed())
            .order_by(order_by)
            .limit(BATCH_ROWS)
        )
        return [
            _Watched(**{**row._mapping, "task_id": str(row.task_id), "watched": bool(row.watched)})
            for row in conn.execute(query)
        ]

    def _give_up_on_expired(self, rows: list[_Watched]) -> ConfirmationResult:
        """Stop watching tasks whose ``expires`` has passed: a worker discards them unrun,
        so no consumer will confirm them, and publishing them again is pointless."""
        expired = self._update_ids(
            [row.id for row in rows],
            confirm_deadline=None,
            last_error="expired before any consumer ran it",
        )
        return ConfirmationResult(expired=expired)

    def _give_another_delivery(
        self, rows: Iterable[_Watched], now: datetime, reason: str
    ) -> ConfirmationResult:
        """Publish again, or give up after ``max_deliveries`` unconfirmed publishes."""
        rows = list(rows)
        spent = [row.id for row in rows if row.deliveries >= self.settings.max_deliveries]
        again = [row.id for row in rows if row.deliveries < self.settings.max_deliveries]
        dead = self._update_ids(
            spent,
            still_unconfirmed=True,
            status=OutboxStatus.DEAD,
            confirm_deadline=now + self._timeout,
            last_error=f"{reason}; dead after {self.settings.max_deliveries} deliveries",
        )
        republished = self._update_ids(
            again, still_unconfirmed=True, **self._republish_values(now, reason)
        )
        return ConfirmationResult(republished=republished, dead=dead)

    def _republish_values(self, now: datetime, reason: str) -> dict[str, Any]:
        return {
            "status": OutboxStatus.PENDING,
            "available_at": now,
            # Watched on: the relay sets a new deadline when it publishes the row.
            "confirm_deadline": now + self._timeout,
            "last_error": f"{reason}: published again",
        }

    def _update_ids(self, ids: list[int], *, still_unconfirmed: bool = False, **values: Any) -> int:
        """Set ``values`` on the rows ``ids`` (a dispatched row only if still unconfirmed)."""
        if not ids:
            return 0
        statement = update(outbox_table).where(_t.id.in_(ids))
        if still_unconfirmed:
            statement = statement.where(_t.status == OutboxStatus.DISPATCHED, ~self._processed())
        with self.engine.begin() as conn:
            return int(conn.execute(statement.values(**values)).rowcount)

    def _update_in_batches(self, ids: Select[Any], **values: Any) -> int:
        """Set ``values`` on every row ``ids`` selects, ``BATCH_ROWS`` per transaction."""
        total = 0
        batch = self.store.among(_t.id, ids.limit(BATCH_ROWS))
        statement = update(outbox_table).where(batch).values(**values)
        while True:
            with self.engine.begin() as conn:
                changed = int(conn.execute(statement).rowcount)
            total += changed
            if changed < BATCH_ROWS:
                return total


def _expired(options: Any, now: datetime) -> bool:
    expires = options.get("expires") if isinstance(options, dict) else None
    return isinstance(expires, str) and datetime.fromisoformat(expires) <= now


def _last_sign_of_life(row: _Watched) -> datetime:
    """The latest moment the task was known to be alive: dispatched, started, retried
    (until its countdown is due)."""
    moments = (row.dispatched_at, row.task_started_at, row.task_finished_at, row.task_retry_eta)
    return max(moment for moment in moments if moment is not None)
