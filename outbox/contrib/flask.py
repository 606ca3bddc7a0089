"""Flask extension: ``Outbox(app, db)`` and the ``flask outbox`` command group."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import click
from celery import Celery
from celery.canvas import Signature
from celery.result import AsyncResult
from flask import Flask, current_app
from flask.cli import with_appcontext
from rich.console import Console
from rich.table import Table

from outbox.enqueue import SessionLike, TaskOutbox, TaskRef, utcnow
from outbox.errors import OutboxError
from outbox.relay import Relay
from outbox.schema import create_tables
from outbox.settings import OutboxSettings
from outbox.stats import collect_stats

EXTENSION_NAME = "outbox"


@dataclass
class _OutboxState:
    """Per-application state, kept in ``app.extensions["outbox"]``."""

    db: Any
    celery_app: Celery
    settings: OutboxSettings
    tasks: TaskOutbox
    _relay: Relay | None = field(default=None, repr=False)

    @property
    def relay(self) -> Relay:
        # db.engine needs an application context, so build the relay on first use.
        if self._relay is None:
            self._relay = Relay(self.db.engine, self.celery_app, self.settings)
        return self._relay


class Outbox:
    """The task outbox as a Flask extension, enqueueing into Flask-SQLAlchemy's ``db.session``.

    ``Outbox(app, db, celery=celery_app)``, or ``Outbox(db=db, celery=...)`` then
    ``init_app(app)``. When ``celery`` is omitted, ``app.extensions["celery"]`` is used (the
    layout Flask's Celery guide recommends). Settings come from ``OUTBOX_*`` config keys.
    """

    def __init__(self, app: Flask | None = None, db: Any = None, *, celery: Celery | None = None):
        self._db = db
        self._celery = celery
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask, db: Any = None, *, celery: Celery | None = None) -> None:
        db = db if db is not None else self._db
        celery_app = celery or self._celery or app.extensions.get("celery")
        if db is None:
            raise OutboxError(
                "Outbox needs the Flask-SQLAlchemy extension: Outbox(app, db) or init_app(app, db)."
            )
        if not isinstance(celery_app, Celery):
            raise OutboxError(
                f"Outbox needs a Celery app, got {celery_app!r}: pass celery=celery_app or set "
                'app.extensions["celery"].'
            )
        app.extensions[EXTENSION_NAME] = _OutboxState(
            db=db,
            celery_app=celery_app,
            settings=OutboxSettings.from_mapping(app.config),
            tasks=TaskOutbox(celery_app, default_session=lambda: db.session),
        )
        app.cli.add_command(outbox_cli)

    @property
    def state(self) -> _OutboxState:
        state: _OutboxState = current_app.extensions[EXTENSION_NAME]
        return state

    @property
    def relay(self) -> Relay:
        """The current app's relay (needs an application context)."""
        return self.state.relay

    def delay(self, task: TaskRef, /, *args: Any, **kwargs: Any) -> AsyncResult[Any]:
        """``task.delay(...)`` through the outbox, in ``db.session``.

        Invisible until ``db.session`` commits, gone if it rolls back.
        """
        return self.state.tasks.delay(task, *args, **kwargs)

    def apply_async(
        self,
        task: TaskRef,
        /,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        *,
        session: SessionLike | None = None,
        **options: Any,
    ) -> AsyncResult[Any]:
        """``task.apply_async(...)`` through the outbox; see :meth:`TaskOutbox.apply_async`.

        Invisible until the session (``db.session`` by default) commits, gone if it rolls
        back.
        """
        return self.state.tasks.apply_async(task, args, kwargs, session=session, **options)

    def enqueue(
        self, signature: Signature[Any], /, *, session: SessionLike | None = None
    ) -> AsyncResult[Any]:
        """Enqueue a signature through the outbox; invisible until commit, gone on rollback."""
        return self.state.tasks.enqueue(signature, session=session)

    def create_tables(self) -> None:
        """Create the outbox table in the app's database if it does not exist."""
        create_tables(self.state.db.engine)


@click.group("outbox")
def outbox_cli() -> None:
    """Inspect and operate the task outbox."""


@outbox_cli.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@with_appcontext
def status_command(as_json: bool) -> None:
    """Row counts per status and the age of the oldest due pending row."""
    state: _OutboxState = current_app.extensions[EXTENSION_NAME]
    stats = collect_stats(state.db.engine, utcnow())
    if as_json:
        click.echo(json.dumps(stats.as_dict()))
        return
    table = Table(title="celery-outbox")
    table.add_column("status")
    table.add_column("rows", justify="right")
    table.add_row("pending", str(stats.pending))
    table.add_row("  of which due", str(stats.due))
    table.add_row("dispatched", str(stats.dispatched))
    table.add_row("dead", str(stats.dead), style="red" if stats.dead else None)
    console = Console()
    console.print(table)
    age = stats.oldest_pending_age_seconds
    console.print("oldest due pending row: " + ("none" if age is None else f"{age:.1f}s overdue"))
