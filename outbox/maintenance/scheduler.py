"""When a relay runs its maintenance, and which passes: one scheduler for every relay.

Each pass is a service with one method, ``run_once()``. A relay has two kinds:

- its **own** passes, which say something about this relay and run in every relay (the
  heartbeat: status and ``/healthz`` count the relays that run);
- the **outbox-wide** passes (confirmation, key keeper), which look at every row and
  every key: they run in one relay at a time, the holder of the lease
  (:mod:`outbox.maintenance.lease`), so that three relays run each once per interval,
  not three times.

The batch relay asks between drains (:meth:`MaintenanceScheduler.run_if_due`), the relay
loop from a thread of its own; an operator's or a test's explicit pass
(:meth:`MaintenanceScheduler.run_now`) runs everything, elected or not.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Protocol

from outbox.clock import Clock, utcnow
from outbox.maintenance.lease import Lease

logger = logging.getLogger(__name__)

#: Longest wait between two maintenance passes of a relay, in seconds of its clock. A
#: relay woken by every commit drains hundreds of times a second: maintaining on each
#: would cost more than the batches themselves.
MAINTENANCE_INTERVAL = 5.0


class MaintenanceService(Protocol):
    """One maintenance pass."""

    def run_once(self) -> object:
        """Run the pass once, and say what it did."""


class MaintenanceScheduler:
    """Runs a relay's passes every ``interval`` seconds: its own always, the outbox-wide
    ones while it holds ``lease`` (every time when ``lease`` is ``None``)."""

    def __init__(
        self,
        *,
        own: Mapping[str, MaintenanceService],
        elected: Mapping[str, MaintenanceService],
        lease: Lease | None,
        interval: float = MAINTENANCE_INTERVAL,
        clock: Clock = utcnow,
    ) -> None:
        self.own = dict(own)
        self.elected = dict(elected)
        self.lease = lease
        self.interval = timedelta(seconds=interval)
        self._clock = clock
        self._next: datetime | None = None
        #: Whether this relay held the lease at its last pass: what ``stop`` gives up.
        self.holds_lease = False

    def run_if_due(self) -> dict[str, object] | None:
        """If a pass is due: run this relay's own passes, then the outbox-wide ones if it
        holds the lease. Their results by name, or ``None`` when they did not run."""
        now = self._clock()
        if self._next is not None and now < self._next:
            return None
        self._next = now + self.interval
        self._run(self.own)
        try:
            self.holds_lease = self.lease is None or self.lease.hold()
        except Exception as e:
            # Publishing does not wait on the lease: the passes wait for the next interval.
            self.holds_lease = False
            logger.error(  # noqa: TRY400 - a line each pass, not a traceback every 5 s
                "could not take the maintenance lease, so confirmation and the key keeper "
                "wait for the next pass (if the table celery_outbox_leases is missing, run "
                "the outbox's migrations): %s",
                e,
            )
        if not self.holds_lease:
            return None
        return self._run(self.elected)

    def run_now(self) -> dict[str, object]:
        """Run every pass now, elected or not: their results by name."""
        return {**self._run(self.own), **self._run(self.elected)}

    def stop(self) -> None:
        """Give the lease up, so that another relay takes the passes over at once."""
        if self.lease is None or not self.holds_lease:
            return
        self.holds_lease = False
        try:
            self.lease.release()
        except Exception as e:  # the database is away: the lease expires by itself
            logger.warning("could not give up the maintenance lease (it expires): %s", e)

    @staticmethod
    def _run(services: Mapping[str, MaintenanceService]) -> dict[str, object]:
        return {name: service.run_once() for name, service in services.items()}
