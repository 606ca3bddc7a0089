"""An orders service that confirms orders and hands follow-up work to Celery via the outbox."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import click
from flask import Flask
from flask.cli import with_appcontext
from sqlalchemy import event
from sqlalchemy.engine import Engine

from outbox.contrib.dashboard import dashboard_blueprint
from outbox.contrib.monitoring import monitoring_blueprint
from outbox.schema import create_tables
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


@click.command("init-db")
@with_appcontext
def init_db_command() -> None:
    """Create every table the app and the outbox need (idempotent)."""
    init_db(db.engine)
    click.echo(f"tables ready in {db.engine.url.render_as_string(hide_password=True)}")
