"""The shipped Alembic migrations build exactly the schema the models describe."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from sqlalchemy import Engine, create_engine, make_url, text

import outbox
from outbox.migrations import VERSIONS_DIR
from tests.mariadb import create_database as create_mariadb_database
from tests.mariadb import drop_database as drop_mariadb_database

ENV_PY = """
from alembic import context

context.configure(connection=context.config.attributes["connection"])
with context.begin_transaction():
    context.run_migrations()
"""

SCHEMA_QUERIES = {
    "columns": """SELECT table_name, column_name, data_type, is_nullable, column_default
                  FROM information_schema.columns
                  WHERE table_name LIKE 'celery_outbox%' ORDER BY 1, 2""",
    "indexes": """SELECT indexname, indexdef FROM pg_indexes
                  WHERE tablename LIKE 'celery_outbox%' ORDER BY 1""",
    "constraints": """SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint
                      WHERE conrelid::regclass::text LIKE 'celery_outbox%' ORDER BY 1""",
    "triggers": """SELECT tgname, pg_get_triggerdef(oid) FROM pg_trigger
                   WHERE NOT tgisinternal ORDER BY 1""",
    "functions": r"""SELECT proname, btrim(regexp_replace(prosrc, '\s+', ' ', 'g'))
                     FROM pg_proc WHERE proname LIKE 'celery_outbox%' ORDER BY 1""",
    "sequences": """SELECT c.relname, s.seqstart, s.seqmin, c.relacl::text
                    FROM pg_sequence s JOIN pg_class c ON c.oid = s.seqrelid
                    WHERE c.relname LIKE 'celery_outbox%' ORDER BY 1""",
}


def migrate(engine: Engine, tmp_path: Path) -> None:
    """Run the outbox branch to head through Alembic, as an application's env.py would."""
    script_dir = tmp_path / "alembic"
    script_dir.mkdir(exist_ok=True)
    (script_dir / "env.py").write_text(ENV_PY)
    config = Config()
    config.set_main_option("script_location", str(script_dir))
    config.set_main_option("version_locations", str(VERSIONS_DIR))
    config.set_main_option("path_separator", "os")
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, "outbox@head")


@pytest.fixture
def scratch_database() -> Iterator[Engine]:
    """An empty PostgreSQL database of its own, dropped afterwards."""
    url = make_url(os.environ["DATABASE_URL"])
    name = f"{url.database}_migrations"
    admin = url.set(drivername="postgresql", database="postgres").render_as_string(False)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    engine = create_engine(url.set(database=name))
    try:
        yield engine
    finally:
        engine.dispose()
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def describe(engine: Engine) -> dict[str, list[tuple[object, ...]]]:
    with engine.connect() as conn:
        return {
            name: [tuple(row) for row in conn.execute(text(query))]
            for name, query in SCHEMA_QUERIES.items()
        }


@pytest.mark.postgresql
def test_migrations_equal_the_models_on_postgres(
    engine: Engine, scratch_database: Engine, tmp_path: Path
) -> None:
    """Columns, defaults, partial indexes, constraints, the NOTIFY trigger, its function and
    the sequence it reads all match."""
    migrate(scratch_database, tmp_path)
    # ``engine`` is this run's database, built from the models by init-db.
    assert describe(engine) == describe(scratch_database)
    with scratch_database.connect() as conn:
        assert [] == compare_metadata(MigrationContext.configure(conn), outbox.metadata)


def test_migrations_equal_the_models_on_sqlite(tmp_path: Path) -> None:
    """On SQLite too, autogenerate finds nothing left to change after the migration."""
    engine = create_engine(f"sqlite:///{tmp_path / 'migrated.sqlite3'}")
    try:
        migrate(engine, tmp_path)
        with engine.connect() as conn:
            assert [] == compare_metadata(MigrationContext.configure(conn), outbox.metadata)
            indexes = dict(
                conn.execute(
                    text(
                        "SELECT name, sql FROM sqlite_master "
                        "WHERE type = 'index' AND sql IS NOT NULL"
                    )
                ).all()
            )
        assert "WHERE status = 'pending'" in indexes["ix_celery_outbox_pending_due"]
    finally:
        engine.dispose()


MARIADB_SCHEMA_QUERIES = {
    "columns": """SELECT table_name, column_name, column_type, is_nullable, column_default
                  FROM information_schema.columns
                  WHERE table_schema = DATABASE() AND table_name LIKE 'celery_outbox%'
                  ORDER BY 1, 2""",
    "indexes": """SELECT table_name, index_name, non_unique, seq_in_index, column_name
                  FROM information_schema.statistics
                  WHERE table_schema = DATABASE() AND table_name LIKE 'celery_outbox%'
                  ORDER BY 1, 2, 4""",
    "checks": """SELECT table_name, constraint_name, check_clause
                 FROM information_schema.check_constraints
                 WHERE constraint_schema = DATABASE() AND table_name LIKE 'celery_outbox%'
                 ORDER BY 1, 2""",
}


def describe_mariadb(engine: Engine) -> dict[str, list[tuple[object, ...]]]:
    with engine.connect() as conn:
        return {
            name: [tuple(row) for row in conn.execute(text(query))]
            for name, query in MARIADB_SCHEMA_QUERIES.items()
        }


def test_migrations_equal_the_models_on_mariadb(mariadb_engine: Engine, tmp_path: Path) -> None:
    """Column types (DATETIME(6), CHAR(32) ids), the status-led indexes and JSON checks
    match the tables the models create, and autogenerate finds nothing to change."""
    name = f"{mariadb_engine.url.database}_migrations"
    url = create_mariadb_database(name)
    engine = create_engine(url)
    try:
        migrate(engine, tmp_path)
        assert describe_mariadb(mariadb_engine) == describe_mariadb(engine)
        with engine.connect() as conn:
            assert [] == compare_metadata(MigrationContext.configure(conn), outbox.metadata)
        columns = {
            (table, column): column_type
            for table, column, column_type, *_ in describe_mariadb(engine)["columns"]
        }
        assert "datetime(6)" == columns[("celery_outbox", "available_at")]
        assert "char(32)" == columns[("celery_outbox", "task_id")]
    finally:
        engine.dispose()
        drop_mariadb_database(name)
