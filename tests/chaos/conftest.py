"""Chaos tests reuse the integration fixtures: this run's database, Redis DB and worker."""

from tests.integration.conftest import (
    _empty_tables,
    app,
    celery_app,
    database_url,
    engine,
    redis_client,
    worker,
)

__all__ = [
    "_empty_tables",
    "app",
    "celery_app",
    "database_url",
    "engine",
    "redis_client",
    "worker",
]
