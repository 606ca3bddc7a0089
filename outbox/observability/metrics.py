"""Prometheus metrics for the outbox.

Two kinds: counters and a histogram the relay updates as it publishes (meaningful in
the process that runs the relay: a worker running sweeps, or ``flask outbox relay``),
and gauges read from the table at scrape time (meaningful anywhere, e.g. the web app's
``/metrics``), so every process reports the same backlog.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import datetime

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy.engine import Engine

from outbox.observability.stats import collect_stats

PUBLISHED = Counter(
    "celery_outbox_published",
    "Outbox rows published to the broker.",
    ["task"],
)
PUBLISH_FAILURES = Counter(
    "celery_outbox_publish_failures",
    "Publishes that failed: a row's own failure (reason=row) or the broker (reason=broker).",
    ["reason"],
)
DISPATCH_LAG = Histogram(
    "celery_outbox_dispatch_lag_seconds",
    "Seconds from a row becoming due (its commit, or its countdown/eta) to its publish.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)


_GAUGES = (
    "celery_outbox_pending",
    "celery_outbox_due",
    "celery_outbox_dead",
    "celery_outbox_oldest_pending_age_seconds",
    "celery_outbox_relay_last_run_seconds",
    "celery_outbox_blocked_keys",
    "celery_outbox_oldest_blocked_key_age_seconds",
    "celery_outbox_cdc_slot_lag_bytes",
    "celery_outbox_cdc_slot_lag_seconds",
    "celery_outbox_cdc_slot_active",
)


class OutboxCollector(Collector):
    """Backlog gauges, read at scrape time through indexes only (``outbox.observability.stats``)."""

    def __init__(self, engine: Callable[[], Engine], clock: Callable[[], datetime]) -> None:
        self._engine = engine
        self._clock = clock

    def describe(self) -> Iterator[GaugeMetricFamily]:
        # Names only: registering must not query the database.
        for name in _GAUGES:
            yield GaugeMetricFamily(name, "")

    def collect(self) -> Iterator[GaugeMetricFamily]:
        stats = collect_stats(self._engine(), self._clock())
        yield GaugeMetricFamily(
            "celery_outbox_pending", "Rows waiting to be published.", value=stats.pending
        )
        yield GaugeMetricFamily(
            "celery_outbox_due", "Pending rows whose time has come.", value=stats.due
        )
        yield GaugeMetricFamily(
            "celery_outbox_dead", "Rows that exhausted their attempts.", value=stats.dead
        )
        yield GaugeMetricFamily(
            "celery_outbox_oldest_pending_age_seconds",
            "Seconds the oldest due pending row has waited since it became due.",
            value=stats.oldest_pending_age_seconds or 0.0,
        )
        yield GaugeMetricFamily(
            "celery_outbox_blocked_keys",
            "Ordering keys stopped at a task that failed for good or went dead.",
            value=stats.blocked_keys,
        )
        yield GaugeMetricFamily(
            "celery_outbox_oldest_blocked_key_age_seconds",
            "Seconds since the longest-blocked ordering key stopped (0 when none is).",
            value=stats.oldest_blocked_age_seconds or 0.0,
        )
        slot = stats.cdc_slot
        if slot is not None:
            # Only where a CDC relay's slot exists: WAL the server keeps for it.
            yield GaugeMetricFamily(
                "celery_outbox_cdc_slot_lag_bytes",
                "Bytes of WAL the CDC relay's replication slot keeps beyond what it confirmed.",
                value=slot.lag_bytes or 0,
            )
            yield GaugeMetricFamily(
                "celery_outbox_cdc_slot_lag_seconds",
                "Seconds the CDC relay is behind the WAL, as the server measured it last.",
                value=slot.lag_seconds or 0.0,
            )
            yield GaugeMetricFamily(
                "celery_outbox_cdc_slot_active",
                "1 while a CDC relay streams from the slot, 0 otherwise (-1: invalidated).",
                value=-1 if slot.invalidated else int(slot.active),
            )
        if stats.last_relay_run_seconds_ago is not None:
            # Absent until a relay has run: alert on its absence as well as its size.
            yield GaugeMetricFamily(
                "celery_outbox_relay_last_run_seconds",
                "Seconds since any relay or beat sweep last ran.",
                value=stats.last_relay_run_seconds_ago,
            )


def register_outbox_collector(
    engine: Callable[[], Engine],
    clock: Callable[[], datetime],
    registry: CollectorRegistry = REGISTRY,
) -> OutboxCollector:
    """Add the backlog gauges to ``registry`` (the default one unless told otherwise)."""
    collector = OutboxCollector(engine, clock)
    registry.register(collector)
    return collector
