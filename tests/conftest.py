"""Session-wide wiring: every test run gets its own PostgreSQL database and Redis DB index.

The environment is set in ``pytest_configure``, before any test module imports
``webapp`` or ``tasks``, because ``celeryconfig`` reads it once at import. Nothing is
created here: the integration fixtures create the database on first use, so unit tests
run without services.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid

import pytest

from tests.mariadb import create_database, drop_database
from tests.redis_claim import claim_redis_db, release_redis_db

PG_SERVER = "postgresql+psycopg://postgres@127.0.0.1:5432"
REDIS_SERVER = "redis://127.0.0.1:6379"

pytest_plugins = ["tests.services"]

RUN_ID = uuid.uuid4().hex[:12]
TEST_DATABASE = os.environ.get("OUTBOX_TEST_DATABASE", "postgresql")
#: This run's MariaDB database (and user) when the app runs on MariaDB; otherwise the
#: store tests make one of their own (``mariadb_engine`` in tests.services).
MARIADB_DATABASE = f"outbox_test_{RUN_ID}"
REDIS_DB = pytest.StashKey[int | None]()
DEMO_DIR = pytest.StashKey[str]()


def pytest_configure(config: pytest.Config) -> None:
    redis_db = claim_redis_db(REDIS_SERVER, RUN_ID)
    config.stash[REDIS_DB] = redis_db
    # The database the example app, its worker and the integration tests share. The store
    # tests run on every database whatever this is (``store_engine`` in tests.services);
    # OUTBOX_TEST_DATABASE=mariadb runs the whole suite's app on MariaDB instead.
    if TEST_DATABASE == "mariadb":
        os.environ["DATABASE_URL"] = create_database(MARIADB_DATABASE)
    else:
        os.environ["DATABASE_URL"] = f"{PG_SERVER}/outbox_test_{RUN_ID}"
    os.environ["CELERY_BROKER_URL"] = f"{REDIS_SERVER}/{redis_db if redis_db is not None else 15}"
    os.environ["CELERY_RESULT_BACKEND"] = os.environ["CELERY_BROKER_URL"]
    # Whatever falls back to the embedded default writes here, never into the checkout.
    demo_dir = tempfile.mkdtemp(prefix="outbox-test-")
    config.stash[DEMO_DIR] = demo_dir
    os.environ["OUTBOX_DEMO_DIR"] = demo_dir


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(config.stash.get(DEMO_DIR, ""), ignore_errors=True)
    if TEST_DATABASE == "mariadb":
        drop_database(MARIADB_DATABASE)
    redis_db = config.stash.get(REDIS_DB, None)
    if redis_db is None:
        return
    release_redis_db(REDIS_SERVER, redis_db, RUN_ID)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark tests by folder, so `-m "not services"` runs what needs no server."""
    for item in items:
        parts = item.path.parts
        if "integration" in parts:
            item.add_marker(pytest.mark.services)
        elif "chaos" in parts:
            item.add_marker(pytest.mark.services)
            item.add_marker(pytest.mark.chaos)
        elif "browser" in parts:
            item.add_marker(pytest.mark.services)
            item.add_marker(pytest.mark.browser)
        elif "acceptance" in parts:
            item.add_marker(pytest.mark.acceptance)
        if TEST_DATABASE != "postgresql" and item.get_closest_marker("postgresql"):
            item.add_marker(
                pytest.mark.skip(
                    reason=f"PostgreSQL's own feature; the app runs on {TEST_DATABASE}"
                )
            )
