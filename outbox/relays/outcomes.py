"""What a relay records of a publish: delivered rows dispatched, a row's own failure
charged to it with a backoff, a broker outage logged once when it starts and once when
it ends. The batch relay and the CDC stream each have one."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from datetime import datetime, timedelta

from sqlalchemy.engine import Connection

from outbox.consumers.idempotency import confirms_processing
from outbox.data.outbox_rows import ClaimedRow, mark_dispatched, reschedule_failed
from outbox.observability.metrics import DISPATCH_LAG, PUBLISH_FAILURES, PUBLISHED
from outbox.settings import OutboxSettings
from outbox.transports.messages import Route, TaskMessage

logger = logging.getLogger(__name__)


class PublishOutcomes:
    """Records publishes for one relay (``after_publish``: called after each message
    reaches the broker and before its row is marked, the window a crash test aims at)."""

    def __init__(
        self, settings: OutboxSettings, *, after_publish: Callable[[], None] | None = None
    ) -> None:
        self.settings = settings
        self._after_publish = after_publish
        # When the current broker outage began (monotonic), so it is logged once, not per
        # row or per sweep.
        self._outage_started: float | None = None

    def mark_dispatched(
        self,
        conn: Connection,
        delivered: list[tuple[ClaimedRow, TaskMessage]],
        now: datetime,
        *,
        streamed: bool = False,
    ) -> None:
        """Mark ``delivered`` rows dispatched, one statement per route they went to;
        ``streamed`` rows (the CDC relay's, which holds no lock on them) only if they
        are still pending."""
        if not delivered:
            return
        routes: dict[Route, tuple[list[int], list[int]]] = {}
        for row, message in delivered:
            PUBLISHED.labels(task=row.task_name).inc()
            DISPATCH_LAG.observe(max(0.0, (now - row.available_at).total_seconds()))
            ids, watched = routes.setdefault(message.route, ([], []))
            ids.append(row.id)
            if confirms_processing(message.task):
                watched.append(row.id)
            if self._after_publish is not None:
                self._after_publish()
        deadline = now + timedelta(seconds=self.settings.confirm_timeout)
        for route, (ids, watched) in routes.items():
            mark_dispatched(
                conn,
                ids,
                watched=watched,
                now=now,
                deadline=deadline,
                queue=route.queue,
                exchange=route.exchange,
                routing_key=route.routing_key,
                streamed=streamed,
            )

    def record_failure(self, conn: Connection, row: ClaimedRow, error: str, now: datetime) -> bool:
        """Reschedule a row whose publish failed on its own; return whether it is now dead."""
        PUBLISH_FAILURES.labels(reason="row").inc()
        attempts = row.attempts + 1
        dead = attempts >= self.settings.max_attempts
        due = now + timedelta(seconds=self._backoff(attempts))
        reschedule_failed(conn, row.id, attempts=attempts, error=error, due=due, dead=dead)
        return dead

    def note_broker(self, error: BaseException | None) -> None:
        """Log a broker outage once when it starts and once when it ends."""
        if error is not None:
            PUBLISH_FAILURES.labels(reason="broker").inc()
            reason = f"{type(error).__name__}: {error}"
            if self._outage_started is None:
                self._outage_started = time.monotonic()
                logger.warning(
                    "broker unavailable, rows stay pending and are retried on the next run: %s",
                    reason,
                )
            else:
                logger.debug("broker still unavailable: %s", reason)
        elif self._outage_started is not None:
            logger.warning(
                "broker reachable again after %.1fs", time.monotonic() - self._outage_started
            )
            self._outage_started = None

    def _backoff(self, attempts: int) -> float:
        """Exponential backoff with jitter (half to all of the step), so rows that failed
        together spread out."""
        ceiling = min(
            self.settings.retry_backoff_max, self.settings.retry_backoff * 2 ** (attempts - 1)
        )
        return random.uniform(ceiling / 2, ceiling)  # noqa: S311 - jitter, not security
