"""``/metrics`` and ``/healthz`` for a Flask app that uses :class:`outbox.contrib.flask.Outbox`."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, current_app
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from sqlalchemy import text

from outbox.contrib.flask import EXTENSION_NAME
from outbox.enqueue import utcnow
from outbox.metrics import register_outbox_collector
from outbox.stats import collect_stats

#: Default ``OUTBOX_HEALTH_MAX_LAG``: seconds the oldest due row may wait before /healthz fails.
DEFAULT_MAX_LAG = 60.0
BROKER_CHECK_TIMEOUT = 2.0


def monitoring_blueprint() -> Blueprint:
    """A blueprint serving ``/metrics`` (Prometheus) and ``/healthz`` (JSON, 200 or 503)."""
    bp = Blueprint("outbox_monitoring", __name__)
    registries: dict[int, CollectorRegistry] = {}

    @bp.record_once
    def _register(setup: Any) -> None:
        app = setup.app
        registry = CollectorRegistry(auto_describe=True)

        def engine() -> Any:
            return app.extensions[EXTENSION_NAME].db.engine

        register_outbox_collector(engine, utcnow, registry)
        registries[id(app)] = registry

    @bp.get("/metrics")
    def metrics() -> Response:
        app = current_app._get_current_object()  # type: ignore[attr-defined]
        body = generate_latest(REGISTRY) + generate_latest(registries[id(app)])
        return Response(body, mimetype=CONTENT_TYPE_LATEST)

    @bp.get("/healthz")
    def healthz() -> tuple[dict[str, Any], int]:
        state = current_app.extensions[EXTENSION_NAME]
        max_lag = float(current_app.config.get("OUTBOX_HEALTH_MAX_LAG", DEFAULT_MAX_LAG))
        checks: dict[str, Any] = {}
        healthy = True
        try:
            with state.db.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            lag = collect_stats(state.db.engine, utcnow()).oldest_pending_age_seconds or 0.0
            checks["database"] = "ok"
            checks["outbox_lag_seconds"] = round(lag, 3)
            if lag > max_lag:
                healthy = False
                checks["outbox"] = f"oldest due row waited {lag:.1f}s > {max_lag:g}s"
            else:
                checks["outbox"] = "ok"
        except Exception as e:  # any failure to reach the database is the answer
            healthy = False
            checks["database"] = f"{type(e).__name__}: {e}"
        try:
            with state.celery_app.connection_for_write() as conn:
                conn.ensure_connection(max_retries=1, timeout=BROKER_CHECK_TIMEOUT)
            checks["broker"] = "ok"
        except Exception as e:  # likewise for the broker
            healthy = False
            checks["broker"] = f"{type(e).__name__}: {e}"
        return {"status": "ok" if healthy else "failing", **checks}, 200 if healthy else 503

    return bp
