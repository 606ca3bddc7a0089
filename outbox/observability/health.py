"""Judging a stats snapshot: is the outbox being published, and in time?

One judgement for ``/healthz``, the dashboard's headline and ``flask outbox status``, so
they never disagree. Two things can be wrong with the outbox itself: a due row has
waited longer than ``max_lag`` (the relay is behind, or stuck), or no relay has run for
that long (none is running: nothing publishes anything, and with nothing pending yet
that shows nowhere else). Dead rows and blocked ordering keys are shown, never judged:
they wait for a person.

Checking costs a broker connection and several queries, and ``/healthz`` answers anyone:
:class:`RecentAnswer` gives the last answer again for a moment, so a flood of requests
costs one check per ``DEFAULT_CACHE_SECONDS``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Generic, TypeVar

from outbox.clock import Clock, utcnow
from outbox.observability.stats import OutboxStats

T = TypeVar("T")

#: Default ``OUTBOX_HEALTH_MAX_LAG``: seconds a due row may wait, and a relay be silent.
DEFAULT_MAX_LAG = 60.0
#: Default ``OUTBOX_HEALTH_CACHE_SECONDS``: how long ``/healthz`` gives its last answer
#: again before it checks anew. Far below any ``max_lag`` and any prober's period, so an
#: answer is never stale by more than a prober could notice; 0 checks every request.
DEFAULT_CACHE_SECONDS = 1.0

#: What to run when no relay runs, in the words of the example's commands.
START_A_RELAY = (
    "start a Celery worker that consumes the outbox queue (`celery -A <app> worker`) and "
    "Celery beat (`celery -A <app> beat`), or `flask outbox relay`"
)


@dataclass(frozen=True, slots=True)
class OutboxHealth:
    """What is wrong with the outbox, in plain words; ``None`` where nothing is."""

    #: Why the backlog counts as lagging.
    lagging: str | None
    #: Why no relay counts as running.
    no_relay: str | None
    dead: int
    #: Ordering keys stopped at a failed task: shown, like dead rows, never failed on.
    blocked_keys: int = 0
    #: Why the CDC relay's slot is a problem (invalidated, or behind by more than
    #: ``max_lag``): its WAL piles up on the server's disk.
    cdc: str | None = None

    @property
    def ok(self) -> bool:
        return self.lagging is None and self.no_relay is None and self.cdc is None

    @property
    def problems(self) -> list[str]:
        """What ``/healthz`` fails on, in plain words, most urgent first."""
        return [problem for problem in (self.no_relay, self.lagging, self.cdc) if problem]

    @property
    def headline(self) -> str:
        """OK, LAGGING, NO RELAY (what ``/healthz`` fails on), BLOCKED KEYS or DEAD ROWS."""
        if self.no_relay is not None:
            return "NO RELAY"
        if self.lagging is not None:
            return "LAGGING"
        if self.cdc is not None:
            return "CDC SLOT"
        if self.blocked_keys:
            return "BLOCKED KEYS"
        return "DEAD ROWS" if self.dead else "OK"


def assess(stats: OutboxStats, max_lag: float = DEFAULT_MAX_LAG) -> OutboxHealth:
    lag = stats.oldest_pending_age_seconds or 0.0
    lagging = f"the oldest due row has waited {lag:.1f}s (limit {max_lag:g}s)"
    silence = stats.last_relay_run_seconds_ago
    if silence is None:
        no_relay: str | None = f"no relay or sweep has run yet: {START_A_RELAY}"
    elif silence > max_lag:
        no_relay = f"no relay or sweep has run for {silence:.0f}s: {START_A_RELAY}"
    else:
        no_relay = None
    return OutboxHealth(
        lagging=lagging if lag > max_lag else None,
        no_relay=no_relay,
        dead=stats.dead,
        blocked_keys=stats.blocked_keys,
        cdc=_slot_problem(stats, max_lag),
    )


def _slot_problem(stats: OutboxStats, max_lag: float) -> str | None:
    slot = stats.cdc_slot
    if slot is None:
        return None
    if slot.invalidated:
        return (
            f"the CDC relay's replication slot {slot.name} is invalidated: polling "
            "publishes everything; drop it (`outbox cdc drop-slot`) and start the CDC relay "
            "again"
        )
    if not slot.active:
        # Between a relay's death and its standby's take-over the slot is briefly idle;
        # a slot nobody has read for longer only keeps WAL on the server's disk.
        streamed = [r.last_seen_seconds_ago for r in stats.relays if r.kind == "cdc"]
        silence = min(streamed) if streamed else None
        if silence is None or silence > max_lag:
            since = "ever" if silence is None else f"for {silence:.0f}s"
            return (
                f"no CDC relay has streamed from replication slot {slot.name} {since}, and it "
                f"keeps {slot.lag_bytes or 0:,} bytes of WAL: start `outbox relay --cdc`, or "
                "drop the slot (`outbox cdc drop-slot`) if the CDC relay is not used"
            )
        return None
    if slot.lag_seconds is not None and slot.lag_seconds > max_lag:
        return (
            f"the CDC relay's replication slot {slot.name} is {slot.lag_seconds:.0f}s behind "
            f"(limit {max_lag:g}s), keeping {slot.lag_bytes or 0:,} bytes of WAL"
        )
    return None


class RecentAnswer(Generic[T]):
    """The last answer of a check, given again while it is younger than ``max_age``.

    Callers that arrive while the check runs wait for its answer rather than start one
    of their own, so however many ask at once, the check runs at most once per
    ``max_age``. An answer's age counts from the end of its check: a slow one (a broker
    timing out) is not run again back to back. An answer dated after ``clock()`` (the
    wall clock was set back) counts as expired, never as fresh for the hour it jumped.
    """

    def __init__(self, clock: Clock = utcnow) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._answer: tuple[datetime, T] | None = None

    def get(self, check: Callable[[], T], max_age: float) -> T:
        """The last answer if younger than ``max_age`` seconds, else ``check()``'s."""
        if max_age <= 0:
            # Nothing kept: a later caller with a cache must not get this answer.
            return check()
        with self._lock:
            if self._answer is not None:
                answered_at, answer = self._answer
                age = (self._clock() - answered_at).total_seconds()
                if 0 <= age < max_age:
                    return answer
            answer = check()
            self._answer = (self._clock(), answer)
            return answer
