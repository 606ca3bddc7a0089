"""An orders service that confirms orders and hands follow-up work to Celery via the outbox."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import click
from flask import Flask
from flask.cli import with_appcontext
from sqlalchemy import event, inspect
from sqlalchemy.engine import Engine

from outbox.contrib.dashboard import dashboard_blueprint
from outbox.contrib.monitoring import monitoring_blueprint
from outbox.data.schema import create_tables
from outbox.data.schema import metadata as outbox_metadata
from webapp import config
from webapp.accidents import accidents_command
from webapp.errors import register_error_handlers
from webapp.extensions import db, outbox


def create_app(overrides: Mapping[str, Any] | None = None) -> Flask:
    """Build the app from the environment (``webapp.config``), then ``overrides``."""
    from tasks import app as celery_app
    from webapp.orders import bp as orders_bp

    app = Flask(__name__)
    app.config.from_mapping(config.flask_config())
    app.config.from_mapping(overrides or {})
    app.config.setdefault(
        "SQLALCHEMY_ENGINE_OPTIONS", config.engine_options(app.config["SQLALCHEMY_DATABASE_URI"])
    )
    db.init_app(app)
    outbox.init_app(app, celery=celery_app)
    with app.app_context():
        if db.engine.dialect.name == "sqlite":
            event.listen(db.engine, "connect", _sqlite_pragmas)
    app.register_blueprint(orders_bp)
    app.register_blueprint(monitoring_blueprint())
    app.register_blueprint(dashboard_blueprint())
    register_error_handlers(app)
    app.cli.add_command(init_db_command)
    app.cli.add_command(accidents_command)
    return app


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets the web app read while a worker writes; the embedded setup shares one file.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def init_db(engine: Engine) -> None:
    """Create the app's tables and the outbox table; safe to run again."""
    db.metadata.create_all(engine, checkfirst=True)
    create_tables(engine)


def missing_columns(engine: Engine) -> list[str]:
    """``table.column`` for each column the models have and the database lacks: tables
    made by an older version, which ``create_all`` leaves as they are."""
    existing = inspect(engine)
    missing = []
    for table in [*db.metadata.sorted_tables, *outbox_metadata.sorted_tables]:
        if not existing.has_table(table.name):
            continue
        present = {column["name"] for column in existing.get_columns(table.name)}
        missing.extend(f"{table.name}.{c.name}" for c in table.columns if c.name not in present)
    return missing


@click.command("init-db")
@with_appcontext
def init_db_command() -> None:
    """Create every table the app and the outbox need (idempotent)."""
    init_db(db.engine)
    where = db.engine.url.render_as_string(hide_password=True)
    if missing := missing_columns(db.engine):
        raise click.ClickException(
            f"the tables in {where} were made by an older version and lack "
            f"{', '.join(missing)}. For the embedded demo, delete its folder (./var, or "
            "OUTBOX_DEMO_DIR) and run again; for a database to keep, upgrade the outbox's "
            "tables with its Alembic migrations (README: Migrations) and add the example's "
            "columns."
        )
    click.echo(f"tables ready in {where}")
