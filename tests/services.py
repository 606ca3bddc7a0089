"""Fixtures for tests against the real services: this run's PostgreSQL database, Redis DB
and one real Celery worker.

Loaded once as a plugin (``pytest_plugins`` in ``tests/conftest.py``) so the integration
and chaos folders share one database and one worker. The worker is a separate
``celery -A tasks worker`` process, started against the same database and broker as the
tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import pytest
import redis
from celery import Celery
from flask import Flask
from sqlalchemy import Engine, create_engine, insert, make_url, text

from outbox import OutboxStatus, create_tables, outbox_table
from tests.conftest import PG_SERVER, REDIS_DB, RUN_ID, TEST_DATABASE
from tests.logical_postgres import LogicalCluster, logical_cluster
from tests.mariadb import MARIADB_SERVER, MariaDBError
from tests.mariadb import create_database as create_mariadb_database
from tests.mariadb import drop_database as drop_mariadb_database
from tests.rabbitmq import RabbitMQError, create_vhost, delete_vhost

#: The checkout: processes the tests start run in it, as a user runs the commands.
ROOT = Path(__file__).resolve().parents[1]
T = TypeVar("T")


def worker_command(node: str, queues: str | None = None, *, include: str = "") -> list[str]:
    """``celery -A tasks worker`` for tests: two processes, no chatter between workers.

    Without ``queues`` it consumes what a plain ``celery -A tasks worker`` does: every
    queue the app declares (the tasks' and the sweep's). ``include`` names more task
    modules to import.
    """
    return [
        sys.executable, "-m", "celery", "-A", "tasks", "worker",
        *(["--queues", queues] if queues else []),
        *(["--include", include] if include else []),
        "--concurrency", "2", "--loglevel", "INFO", "--hostname", node,
        "--without-gossip", "--without-mingle", "--without-heartbeat",
    ]  # fmt: skip


def wait_for(check: Callable[[], T], *, timeout: float = 20.0, interval: float = 0.05) -> T:
    """Poll ``check`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout}s (last value: {value!r})")
        time.sleep(interval)


@pytest.fixture(scope="session")
def redis_client(pytestconfig: pytest.Config) -> redis.Redis:
    if pytestconfig.stash.get(REDIS_DB, None) is None:
        pytest.fail("Redis on 127.0.0.1:6379 is not reachable (or every test DB is taken).")
    return redis.Redis.from_url(os.environ["CELERY_BROKER_URL"])


@pytest.fixture(scope="session")
def rabbitmq_vhost() -> Iterator[str]:
    """This run's virtual host on the machine's RabbitMQ, removed at the end."""
    vhost = f"outbox_test_{RUN_ID}"
    try:
        create_vhost(vhost)
    except RabbitMQError as e:
        pytest.fail(f"RabbitMQ on 127.0.0.1:5672 is not reachable: {e}")
    yield vhost
    delete_vhost(vhost)


@pytest.fixture(scope="session")
def rabbitmq_url(rabbitmq_vhost: str) -> str:
    return f"amqp://guest:guest@127.0.0.1:5672/{rabbitmq_vhost}"


#: The brokers every broker test runs on.
BROKERS = ("redis", "rabbitmq")


@pytest.fixture(params=BROKERS)
def broker_url(request: pytest.FixtureRequest, redis_client: redis.Redis) -> str:
    """This run's Redis DB, then this run's RabbitMQ virtual host."""
    if request.param == "redis":
        return os.environ["CELERY_BROKER_URL"]
    url: str = request.getfixturevalue("rabbitmq_url")
    return url


def app_on(broker_url: str, name: str = "outbox-test", **settings: Any) -> Celery:
    """A Celery app configured like the example's (``celeryconfig``) on ``broker_url``,
    with the example's tasks registered."""
    from tasks import app as example

    app = Celery(name, set_as_current=False)
    app.config_from_object("celeryconfig")
    # CELERY_BROKER_URL (this run's Redis) outranks broker_url; these two outrank it.
    app.conf.broker_url = app.conf.broker_read_url = app.conf.broker_write_url = broker_url
    if not broker_url.startswith("redis"):
        app.conf.broker_transport_options = {}
    app.conf.update(settings)
    for task_name, task in example.tasks.items():
        if not task_name.startswith("celery."):
            app.tasks.register(task)
    return app


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    """Create this run's database; drop it (and any connection left) at the end."""
    if TEST_DATABASE == "mariadb":  # made and dropped by tests.conftest
        yield os.environ["DATABASE_URL"]
        return
    url = make_url(os.environ["DATABASE_URL"])
    admin = url.set(drivername="postgresql", database="postgres").render_as_string(False)
    try:
        conn = psycopg.connect(admin, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as e:
        pytest.fail(f"PostgreSQL on 127.0.0.1:5432 is not reachable: {e}")
    with conn:
        conn.execute(f'CREATE DATABASE "{url.database}"')
    yield os.environ["DATABASE_URL"]
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{url.database}" WITH (FORCE)')


#: The databases the store tests run on (``store_engine``).
DATABASES = ["postgresql", "mariadb", "sqlite"]


@pytest.fixture(scope="session")
def postgres_engine(request: pytest.FixtureRequest) -> Iterator[Engine]:
    """A PostgreSQL database with the outbox's tables: the app's, or one of its own when
    the app runs on another database."""
    if TEST_DATABASE == "postgresql":
        yield request.getfixturevalue("engine")
        return
    name = f"outbox_store_{RUN_ID}"
    admin = f"{PG_SERVER.replace('+psycopg', '')}/postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    engine = create_engine(f"{PG_SERVER}/{name}")
    create_tables(engine)
    yield engine
    engine.dispose()
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def logical_postgres() -> Iterator[LogicalCluster]:
    """A PostgreSQL cluster of this run's own with ``wal_level = logical``, started on
    first use and removed at the end of the run."""
    with logical_cluster() as cluster:
        yield cluster


@pytest.fixture
def logical_engine(logical_postgres: LogicalCluster) -> Iterator[Engine]:
    """A database of its own on the logical cluster, with the outbox's tables; its
    replication slots and the database are dropped afterwards."""
    name = f"outbox_cdc_{uuid.uuid4().hex[:8]}"
    admin = logical_postgres.dsn("postgres")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    engine = create_engine(logical_postgres.url(name))
    try:
        create_tables(engine)
        yield engine
    finally:
        engine.dispose()
        with psycopg.connect(admin, autocommit=True) as conn:
            # A slot keeps its database: end whatever still reads one, then drop them all.
            slots = "FROM pg_replication_slots WHERE database = %s"
            conn.execute(f"SELECT pg_terminate_backend(active_pid) {slots} AND active", (name,))
            wait_for(lambda: not conn.execute(f"SELECT 1 {slots} AND active", (name,)).fetchone())
            conn.execute(f"SELECT pg_drop_replication_slot(slot_name) {slots}", (name,))
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def mariadb_engine(request: pytest.FixtureRequest) -> Iterator[Engine]:
    """A MariaDB database with the outbox's tables: the app's, or one of its own (and a
    user of its own) when the app runs on another database."""
    if TEST_DATABASE == "mariadb":
        yield request.getfixturevalue("engine")
        return
    name = f"outbox_store_{RUN_ID}"
    try:
        url = create_mariadb_database(name)
    except MariaDBError as e:
        pytest.fail(f"MariaDB on {MARIADB_SERVER} is not usable: {e}")
    engine = create_engine(url, isolation_level="READ COMMITTED", pool_pre_ping=True)
    create_tables(engine)
    yield engine
    engine.dispose()
    drop_mariadb_database(name)


@pytest.fixture(params=DATABASES)
def store_engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """The outbox's tables, empty, on each database the outbox supports in turn."""
    if request.param == "sqlite":
        engine = create_engine(f"sqlite:///{tmp_path / 'store.sqlite3'}")
        create_tables(engine)
        yield engine
        engine.dispose()
        return
    engine = request.getfixturevalue(
        f"{'postgres' if request.param == 'postgresql' else 'mariadb'}_engine"
    )
    empty(engine, OUTBOX_TABLES)
    yield engine


@pytest.fixture(scope="session")
def app(database_url: str, redis_client: redis.Redis) -> Iterator[Flask]:
    from webapp import create_app, init_db
    from webapp.extensions import db

    app = create_app()
    assert database_url == app.config["SQLALCHEMY_DATABASE_URI"]
    with app.app_context():
        init_db(db.engine)
    yield app
    with app.app_context():
        db.engine.dispose()


@pytest.fixture(scope="session")
def engine(app: Flask) -> Engine:
    from webapp.extensions import db

    with app.app_context():
        return db.engine


@pytest.fixture(scope="session")
def celery_app(app: Flask) -> Celery:
    """The example's Celery app, with the tasks only the tests' worker runs registered."""
    import tests.worker_tasks  # noqa: F401  (registers its tasks on the example's app)
    from tasks import app as celery_app

    return celery_app


@contextmanager
def started_worker(
    command: list[str], log: Path, env: dict[str, str], ready: Callable[[], object]
) -> Iterator[subprocess.Popen[bytes]]:
    """A worker process running ``command`` in the checkout, its output in ``log``,
    yielded once ``ready()`` is true (the test fails if it exits first); terminated, and
    killed after 20 s, when it ends."""
    with log.open("wb") as out:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: process.poll() is not None or ready(), timeout=60)
        if process.poll() is not None:
            pytest.fail(f"the Celery worker exited at start-up:\n{log.read_text()}")
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def running_worker(
    celery_app: Celery, node: str, log: Path, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """A ``celery -A tasks worker`` process (with the tests' tasks), answering pings on
    ``celery_app``'s broker before this yields; stopped when it ends."""
    with started_worker(
        worker_command(node, include="tests.worker_tasks"),
        log,
        {**os.environ, **(env or {})},
        lambda: celery_app.control.ping(destination=[node], timeout=0.5),
    ) as process:
        yield process


@pytest.fixture(scope="session")
def worker(
    app: Flask,
    celery_app: Celery,
    tmp_path_factory: pytest.TempPathFactory,
    pytestconfig: pytest.Config,
) -> Iterator[str]:
    """One ``celery -A tasks worker`` process for the session; yields its node name."""
    node = f"outbox-test-{RUN_ID}@localhost"
    log = tmp_path_factory.mktemp("worker") / "worker.log"
    with running_worker(celery_app, node, log):
        pytestconfig.stash[WORKER_LOG] = log
        yield node


@pytest.fixture(scope="session")
def rabbitmq_app(app: Flask, rabbitmq_url: str) -> Celery:
    """The example's tasks on an app whose broker is this run's RabbitMQ vhost."""
    import tests.worker_tasks  # noqa: F401  (registers its tasks on the example's app)

    return app_on(rabbitmq_url, "outbox-test-rabbitmq")


@pytest.fixture(scope="session")
def rabbitmq_worker(
    rabbitmq_app: Celery, rabbitmq_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """``celery -A tasks worker`` with ``CELERY_BROKER_URL`` set to this run's RabbitMQ
    vhost, as the README switches the example; yields its node name."""
    node = f"outbox-test-amqp-{RUN_ID}@localhost"
    log = tmp_path_factory.mktemp("rabbitmq-worker") / "worker.log"
    with running_worker(rabbitmq_app, node, log, {"CELERY_BROKER_URL": rabbitmq_url}):
        yield node


@pytest.fixture
def stack(broker_url: str, request: pytest.FixtureRequest) -> tuple[Celery, str]:
    """The Celery app and a running worker's node on each broker in turn."""
    if broker_url.startswith("redis"):
        return request.getfixturevalue("celery_app"), request.getfixturevalue("worker")
    return request.getfixturevalue("rabbitmq_app"), request.getfixturevalue("rabbitmq_worker")


WORKER_LOG = pytest.StashKey[Path]()


@pytest.fixture
def worker_log(worker: str, pytestconfig: pytest.Config) -> Path:
    """The session worker's log file."""
    return pytestconfig.stash[WORKER_LOG]


@pytest.fixture
def empty_tables(engine: Engine) -> None:
    """Each test starts with empty tables; ids keep growing so late tasks cannot collide."""
    empty(engine, [*OUTBOX_TABLES, "notifications", "stock_reservations", "shipments", "orders"])


#: Emptied before each test. The workers' heartbeats are kept: the session's worker
#: processes beat every 10 s, and one whose row was emptied meanwhile would look gone.
OUTBOX_TABLES = [
    "celery_outbox",
    "celery_outbox_processed",
    "celery_outbox_relays",
    "celery_outbox_brokers",
    "celery_outbox_keys",
    "celery_outbox_leases",
]


def lock_waiters(engine: Engine) -> int:
    """How many of the database's transactions wait on a lock now (this run's database on
    PostgreSQL; this run's user on MariaDB, which shows only its own)."""
    query = {
        "postgresql": "SELECT count(*) FROM pg_stat_activity "
        "WHERE datname = current_database() AND wait_event_type = 'Lock'",
        "mysql": "SELECT count(*) FROM information_schema.innodb_trx WHERE trx_state = 'LOCK WAIT'",
    }[engine.dialect.name]
    with engine.connect() as conn:
        return int(conn.execute(text(query)).scalar_one())


def empty(engine: Engine, tables: list[str]) -> None:
    """Delete every row of ``tables`` (referencing tables first); ids keep growing."""
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(text(f"TRUNCATE {', '.join(tables)}"))
            return
        for table in tables:
            conn.execute(text(f"DELETE FROM {table}"))


def insert_pending_row(
    engine: Engine, task_name: str, args: list[Any], options: dict[str, Any] | None = None
) -> uuid.UUID:
    """A committed pending row written directly, bypassing enqueue's checks: what an
    older deploy (a task or queue since removed) leaves in the table."""
    task_id = uuid.uuid4()
    now = datetime.now(UTC)
    with engine.begin() as conn:
        conn.execute(
            insert(outbox_table).values(
                task_id=task_id,
                task_name=task_name,
                args=args,
                kwargs={},
                options=options or {},
                status=OutboxStatus.PENDING,
                attempts=0,
                created_at=now,
                available_at=now,
            )
        )
    return task_id


#: Figures chaos tests measure, printed as a table at the end of the run.
CHAOS_FIGURES = pytest.StashKey[list[dict[str, object]]]()


@pytest.fixture
def chaos_report(pytestconfig: pytest.Config, request: pytest.FixtureRequest) -> ChaosReport:
    """Record what a chaos test did (messages, faults, lost, phantom, duplicates)."""
    return ChaosReport(pytestconfig, request.node.name)


class ChaosReport:
    def __init__(self, config: pytest.Config, test: str) -> None:
        self._rows = config.stash.setdefault(CHAOS_FIGURES, [])
        self._test = test

    def record(self, **figures: object) -> None:
        self._rows.append({"test": self._test, **figures})


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    rows = config.stash.get(CHAOS_FIGURES, [])
    if not rows:
        return
    terminalreporter.section("chaos figures")
    for row in rows:
        terminalreporter.write_line(json.dumps(row))
