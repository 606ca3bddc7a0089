"""``/metrics`` and ``/healthz`` for a Flask app that uses :class:`outbox.contrib.flask.Outbox`."""

from __future__ import annotations

import logging
from typing import Any

from flask import Blueprint, Response, current_app
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from outbox.clock import Clock, utcnow
from outbox.contrib.flask import EXTENSION_NAME
from outbox.observability.health import DEFAULT_CACHE_SECONDS, DEFAULT_MAX_LAG, RecentAnswer, assess
from outbox.observability.metrics import register_outbox_collector
from outbox.observability.stats import OutboxStats, collect_stats
from outbox.transient import is_transient_database_error

logger = logging.getLogger(__name__)

#: Seconds ``/healthz`` gives its last answer again (default ``DEFAULT_CACHE_SECONDS``);
#: 0 checks on every request.
CACHE_SECONDS_KEY = "OUTBOX_HEALTH_CACHE_SECONDS"

HealthAnswer = tuple[dict[str, Any], int]


def monitoring_blueprint(*, clock: Clock = utcnow) -> Blueprint:
    """A blueprint serving ``/metrics`` (Prometheus) and ``/healthz`` (JSON, 200 or 503).

    ``/healthz`` answers anyone, so it says which check failed and of what kind
    (``unreachable``, ``error``), never the exception's text: that goes to the log. Each
    app checks at most once per ``OUTBOX_HEALTH_CACHE_SECONDS`` (``clock`` dates its
    answers), so a flood of requests does not become a flood of broker connections and
    queries.
    """
    bp = Blueprint("outbox_monitoring", __name__)
    registries: dict[int, CollectorRegistry] = {}
    answers: dict[int, RecentAnswer[HealthAnswer]] = {}

    @bp.record_once
    def _register(setup: Any) -> None:
        app = setup.app
        registry = CollectorRegistry(auto_describe=True)

        def engine() -> Any:
            return app.extensions[EXTENSION_NAME].db.engine

        register_outbox_collector(engine, utcnow, registry)
        registries[id(app)] = registry
        answers[id(app)] = RecentAnswer(clock)

    @bp.get("/metrics")
    def metrics() -> Response:
        app = current_app._get_current_object()  # type: ignore[attr-defined]
        body = generate_latest(REGISTRY) + generate_latest(registries[id(app)])
        return Response(body, mimetype=CONTENT_TYPE_LATEST)

    @bp.get("/healthz")
    def healthz() -> HealthAnswer:
        app = current_app._get_current_object()  # type: ignore[attr-defined]
        max_age = float(app.config.get(CACHE_SECONDS_KEY, DEFAULT_CACHE_SECONDS))
        return answers[id(app)].get(check_health, max_age)

    def check_health() -> HealthAnswer:
        state = current_app.extensions[EXTENSION_NAME]
        max_lag = float(current_app.config.get("OUTBOX_HEALTH_MAX_LAG", DEFAULT_MAX_LAG))
        checks: dict[str, Any] = {}
        stats: OutboxStats | None = None
        try:
            stats = collect_stats(state.db.engine, utcnow())
            checks["database"] = "ok"
        except Exception as e:  # any failure to read the outbox is the answer
            kind = "unreachable" if is_transient_database_error(e) else "error"
            logger.warning("/healthz: the database check failed (%s)", kind, exc_info=True)
            checks["database"] = kind
        if stats is not None:
            health = assess(stats, max_lag)
            checks["outbox"] = health.lagging or "ok"
            checks["relay"] = health.no_relay or "ok"
            checks["outbox_lag_seconds"] = round(stats.oldest_pending_age_seconds or 0.0, 3)
            checks["relay_last_run_seconds_ago"] = (
                None
                if stats.last_relay_run_seconds_ago is None
                else round(stats.last_relay_run_seconds_ago, 1)
            )
            if stats.cdc_slot is not None:
                # Only where a CDC relay's replication slot exists.
                checks["cdc"] = health.cdc or "ok"
                checks["cdc_slot_lag_bytes"] = stats.cdc_slot.lag_bytes
                checks["cdc_slot_lag_seconds"] = stats.cdc_slot.lag_seconds
        checks["broker"] = "ok" if state.probe.reachable() else "unreachable"
        judged = ["database", "outbox", "relay", "broker", *(["cdc"] if "cdc" in checks else [])]
        healthy = all(checks.get(name) == "ok" for name in judged)
        return {"status": "ok" if healthy else "failing", **checks}, 200 if healthy else 503

    return bp
