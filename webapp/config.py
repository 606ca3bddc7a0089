"""The example's configuration, read from the environment in this one place.

Without any variable set, everything runs embedded under ``./var``: a SQLite database,
the outbox's filesystem transport as the broker (``outbox-filesystem://``: kombu's
``filesystem://``, with each message written whole) and Celery's file result backend, so
the demo needs no server. Set ``DATABASE_URL``, ``CELERY_BROKER_URL`` and
``CELERY_RESULT_BACKEND`` for PostgreSQL and Redis.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from outbox import FILESYSTEM_TRANSPORT
from outbox.settings import parse_flag


def var_dir() -> Path:
    """Where the embedded setup keeps its files (``OUTBOX_DEMO_DIR``, default ``./var``)."""
    return Path(os.environ.get("OUTBOX_DEMO_DIR") or Path.cwd() / "var").resolve()


def database_url() -> str:
    url = os.environ.get("DATABASE_URL") or f"sqlite:///{var_dir() / 'orders.sqlite3'}"
    # Hosting platforms hand out postgres:// and mysql:// URLs; SQLAlchemy needs the
    # driver named (its default MySQL driver is mysqlclient, not the mysql extra's).
    for prefix, driver in _DRIVERS.items():
        if url.startswith(prefix):
            return driver + url.removeprefix(prefix)
    return url


_DRIVERS = {
    "postgres://": "postgresql+psycopg://",
    "postgresql://": "postgresql+psycopg://",
    "mysql://": "mysql+pymysql://",
    "mariadb://": "mariadb+pymysql://",
}


#: The embedded broker. kombu's own ``filesystem://`` creates each message's file before
#: writing it, and a worker that takes the empty file dies decoding it; importing
#: ``outbox`` registers this alias, so every process of the example resolves it.
EMBEDDED_BROKER_URL = f"{FILESYSTEM_TRANSPORT}://"
#: URL schemes whose transport keeps its messages in folders (the embedded broker, and
#: kombu's own, which ``CELERY_BROKER_URL`` may still name).
FILESYSTEM_SCHEMES = (EMBEDDED_BROKER_URL, "filesystem://")


def broker_url() -> str:
    return os.environ.get("CELERY_BROKER_URL") or EMBEDDED_BROKER_URL


def result_backend() -> str:
    """``CELERY_RESULT_BACKEND``, else a folder under the demo directory, made here: it is
    the default whatever the broker, not only beside the filesystem broker."""
    configured = os.environ.get("CELERY_RESULT_BACKEND")
    if configured:
        return configured
    results = var_dir() / "results"
    results.mkdir(parents=True, exist_ok=True)
    return f"file://{results}"


#: Redis broker defaults. Every socket operation is bounded, so a broker that hangs
#: (rather than refusing connections) cannot hang a publish or a worker. A message whose
#: worker died holding it (tasks are acknowledged late) goes back to its queue after
#: ``visibility_timeout`` seconds instead of kombu's hour, and live workers look for such
#: messages every ``unacked_restore_interval`` seconds (kombu's default scans every
#: 100 s). The price: a task still running, or a countdown or ETA still waiting in a
#: worker, after 60 s is delivered again; the idempotent consumer skips the copy, but a
#: deployment with longer tasks or countdowns must raise the timeout above them.
REDIS_TRANSPORT_OPTIONS: dict[str, Any] = {
    "socket_timeout": 10,
    "socket_connect_timeout": 5,
    "visibility_timeout": 60,
    "unacked_restore_interval": 5,
    "unacked_restore_throttle": 1,
    # A worker killed while restoring holds kombu's restore lock until it expires.
    "unacked_mutex_expire": 30,
}


def broker_transport_options() -> dict[str, Any]:
    """Transport options: folders for the filesystem broker, timeouts for Redis.

    ``CELERY_BROKER_TRANSPORT_OPTIONS`` (a JSON object) is merged over these, e.g.
    ``{"visibility_timeout": 600}``.
    """
    extra = _json_object("CELERY_BROKER_TRANSPORT_OPTIONS")
    if broker_url().startswith(("redis://", "rediss://")):
        return {**REDIS_TRANSPORT_OPTIONS, **extra}
    if not broker_url().startswith(FILESYSTEM_SCHEMES):
        return extra
    broker_dir = var_dir() / "broker"
    queue_dir, control_dir = broker_dir / "queue", broker_dir / "control"
    for folder in (queue_dir, control_dir):
        folder.mkdir(parents=True, exist_ok=True)
    return {
        "data_folder_in": str(queue_dir),
        "data_folder_out": str(queue_dir),
        "control_folder": str(control_dir),
        **extra,
    }


def _json_object(variable: str) -> dict[str, Any]:
    raw = os.environ.get(variable)
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except ValueError as e:
        raise ValueError(f"{variable}={raw!r} is not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise ValueError(f"{variable}={raw!r} must be a JSON object")  # noqa: TRY004
    return value


def outbox_settings() -> dict[str, str]:
    """The ``OUTBOX_*`` variables, copied into the Flask config as they are.

    :meth:`outbox.OutboxSettings.from_mapping` takes its settings from them, and the
    contrib modules read their own keys: ``OUTBOX_HEALTH_MAX_LAG`` (``/healthz`` and the
    dashboard), ``OUTBOX_FLOWER_URL`` (links to Flower) and
    ``OUTBOX_DASHBOARD_BASIC_AUTH`` (``user:password,...`` for ``/outbox``) and
    ``OUTBOX_DASHBOARD_PUBLIC`` (``true`` opens it without a login; with neither it is
    closed).
    """
    return {
        key: value
        for key, value in os.environ.items()
        if key.startswith("OUTBOX_") and key != "OUTBOX_DEMO_DIR"
    }


def orders_settings() -> dict[str, Any]:
    """The example's own settings: ``ORDERS_TASK_LATENCY_MS`` (each task waits a random
    time up to this, as a real send would; default 0) and
    ``ORDERS_ORDERED_NOTIFICATIONS`` (``false`` enqueues the customer's notices without
    their ordering key, to see what ordering prevents; default true)."""
    settings: dict[str, Any] = {}
    if latency := os.environ.get("ORDERS_TASK_LATENCY_MS"):
        try:
            settings["ORDERS_TASK_LATENCY_MS"] = float(latency)
        except ValueError as e:
            raise ValueError(f"ORDERS_TASK_LATENCY_MS={latency!r} is not a number") from e
    if (ordered := os.environ.get("ORDERS_ORDERED_NOTIFICATIONS")) is not None:
        settings["ORDERS_ORDERED_NOTIFICATIONS"] = parse_flag(
            "ORDERS_ORDERED_NOTIFICATIONS", ordered
        )
    return settings


#: The largest request body the example accepts, in bytes: an order of the largest size
#: allowed (100 items) is a few kilobytes, so 1 MiB refuses only what is not an order,
#: before it is read into memory.
MAX_CONTENT_LENGTH = 1024 * 1024


def max_content_length() -> int:
    """``ORDERS_MAX_CONTENT_LENGTH`` (bytes), else :data:`MAX_CONTENT_LENGTH`; a larger
    body is answered 413."""
    raw = os.environ.get("ORDERS_MAX_CONTENT_LENGTH")
    if not raw:
        return MAX_CONTENT_LENGTH
    try:
        value = int(raw)
    except ValueError as e:
        raise ValueError(
            f"ORDERS_MAX_CONTENT_LENGTH={raw!r} is not a whole number of bytes, e.g. 1048576"
        ) from e
    if value < 1:
        raise ValueError(f"ORDERS_MAX_CONTENT_LENGTH={raw!r} must be at least 1 byte")
    return value


def flask_config() -> dict[str, Any]:
    return {
        "SQLALCHEMY_DATABASE_URI": database_url(),
        "MAX_CONTENT_LENGTH": max_content_length(),
        **outbox_settings(),
        **orders_settings(),
    }


def engine_options(database_uri: str) -> dict[str, Any]:
    """Engine options for the final database URI (after any test overrides)."""
    if database_uri.startswith(("mysql", "mariadb")):
        # InnoDB's default REPEATABLE READ locks the gaps between index entries: the
        # outbox's inserts and the relay's claim would block and deadlock each other.
        return {"pool_pre_ping": True, "isolation_level": "READ COMMITTED"}
    if not database_uri.startswith("sqlite"):
        # Test each pooled connection before handing it out: after a database restart
        # every pooled connection is dead, and without the check each would fail the
        # request it was given, long after the database is back.
        return {"pool_pre_ping": True}
    if database_uri.startswith("sqlite:///") and ":memory:" not in database_uri:
        Path(database_uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    # Web, worker and beat share one file: wait for a lock instead of failing at once.
    return {"connect_args": {"timeout": 30}}
