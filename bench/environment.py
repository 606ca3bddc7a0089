"""The benchmark's own PostgreSQL database and Redis DB index, made for one run and removed
(and a MariaDB database, for the sections that need one).

The benchmark truncates tables and empties queues between runs, so it must never share a
database or a Redis DB with a test run or an application: the database is new, named after
this process, and the Redis DB index is claimed exactly as test runs claim theirs
(:mod:`tests.redis_claim`), so a test run and a benchmark never hold the same one.

The environment is set here, before anything imports ``webapp``, ``tasks`` or
``celeryconfig``: the example reads ``DATABASE_URL``, ``CELERY_BROKER_URL`` and
``CELERY_RESULT_BACKEND`` once, at import, and child processes inherit them.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg
from sqlalchemy import Engine, create_engine, make_url

from tests.mariadb import create_database, drop_database
from tests.redis_claim import claim_redis_db, release_redis_db

DEFAULT_DATABASE_SERVER = "postgresql+psycopg://postgres@127.0.0.1:5432"
DEFAULT_REDIS = "redis://127.0.0.1:6379"


class ServicesUnavailableError(Exception):
    """PostgreSQL or Redis cannot be used for the benchmark (the message says why)."""


@dataclass(frozen=True, slots=True)
class Services:
    """Where this run's database and broker are."""

    database_url: str
    database: str
    #: The ``postgres`` maintenance database on the same server, to create and drop ours.
    admin_url: str
    redis_server: str
    redis_db: int
    #: Child process logs and anything else the run writes; removed at the end.
    work_dir: Path

    @property
    def redis_url(self) -> str:
        return f"{self.redis_server}/{self.redis_db}"


@contextmanager
def services() -> Iterator[Services]:
    """Create the database, claim a Redis DB and export the environment; undo all at exit.

    Everything is undone however the block ends (an error, Ctrl-C, SIGTERM turned into
    ``SystemExit``): the database is dropped with ``FORCE`` so connections a child left
    behind cannot keep it alive, and the Redis DB is emptied, which drops the claim.
    """
    server = os.environ.get("OUTBOX_BENCH_DATABASE_SERVER", DEFAULT_DATABASE_SERVER).rstrip("/")
    redis_server = os.environ.get("OUTBOX_BENCH_REDIS", DEFAULT_REDIS).rstrip("/")
    owner = f"bench-{os.getpid()}-{os.urandom(4).hex()}"
    database = f"outbox_bench_{os.getpid()}"
    url = make_url(f"{server}/{database}")
    admin_url = url.set(drivername="postgresql", database="postgres").render_as_string(
        hide_password=False
    )
    with ExitStack() as cleanup:
        redis_db = claim_redis_db(redis_server, owner)
        if redis_db is None:
            raise ServicesUnavailableError(
                f"Redis at {redis_server} is not reachable, or every DB index 1-15 is held by "
                "a test run: set OUTBOX_BENCH_REDIS, or wait for the runs to finish."
            )
        cleanup.callback(release_redis_db, redis_server, redis_db, owner)
        _create_database(admin_url, database)
        cleanup.callback(_drop_database, admin_url, database)
        work_dir = Path(tempfile.mkdtemp(prefix="outbox-bench-"))
        cleanup.callback(shutil.rmtree, work_dir, ignore_errors=True)
        found = Services(
            database_url=url.render_as_string(hide_password=False),
            database=database,
            admin_url=admin_url,
            redis_server=redis_server,
            redis_db=redis_db,
            work_dir=work_dir,
        )
        os.environ["DATABASE_URL"] = found.database_url
        os.environ["CELERY_BROKER_URL"] = found.redis_url
        os.environ["CELERY_RESULT_BACKEND"] = found.redis_url
        # Whatever falls back to the embedded defaults writes here, never into the checkout.
        os.environ["OUTBOX_DEMO_DIR"] = str(work_dir / "var")
        yield found


def _create_database(admin_url: str, database: str) -> None:
    try:
        with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'CREATE DATABASE "{database}"')
    except psycopg.OperationalError as e:
        raise ServicesUnavailableError(
            f"PostgreSQL at {make_url(admin_url).render_as_string()} is not reachable: {e} "
            "(set OUTBOX_BENCH_DATABASE_SERVER)"
        ) from e


def _drop_database(admin_url: str, database: str) -> None:
    with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


@contextmanager
def mariadb_database() -> Iterator[tuple[Engine, str]]:
    """This run's MariaDB database and user (``outbox_bench_<pid>``, through ``mariadb
    -uroot`` on 127.0.0.1:3306) with the example's tables: its engine and URL; dropped
    when the block ends, however it ends."""
    from webapp import init_db
    from webapp.config import engine_options

    name = f"outbox_bench_{os.getpid()}"
    url = create_database(name)
    engine = create_engine(url, **engine_options(url))
    try:
        init_db(engine)
        yield engine, url
    finally:
        engine.dispose()
        drop_database(name)


def due_check_ms() -> str:
    """How often a relay on MariaDB, which has no NOTIFY, checks for a due row while it
    waits (ms), as the figures name it."""
    from outbox.data.mysql import MySQLStore

    return f"{(MySQLStore.due_check_interval or 0) * 1000:g}"
