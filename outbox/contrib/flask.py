"""Flask extension: ``Outbox(app, db)`` and the ``flask outbox`` command group (the
commands of :mod:`outbox.admin.cli`, given the app's database, Celery app and settings)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ParamSpec, TypeVar, overload

import click
from celery import Celery
from celery.canvas import Signature
from celery.result import AsyncResult
from flask import Flask, current_app
from flask.cli import with_appcontext
from sqlalchemy import make_url

from outbox.admin.cli import COMMANDS, Operations
from outbox.consumers.idempotency import DEFAULT_TRANSIENT_RETRIES, idempotent
from outbox.consumers.lifecycle import LifecycleTracker
from outbox.data import store_named
from outbox.data.schema import create_tables
from outbox.enqueue.task_outbox import OrderedOutbox, SessionLike, TaskOutbox, TaskRef
from outbox.errors import OutboxError
from outbox.maintenance.heartbeat import RelayKind
from outbox.relays.batch import Relay
from outbox.settings import OutboxSettings
from outbox.transports import BrokerProbe, probe_for

EXTENSION_NAME = "outbox"
logger = logging.getLogger(__name__)
P = ParamSpec("P")
R = TypeVar("R")


@dataclass
class _OutboxState:
    """Per-application state, kept in ``app.extensions["outbox"]``."""

    db: Any
    celery_app: Celery
    settings: OutboxSettings
    tasks: TaskOutbox
    _relay: Relay | None = field(default=None, repr=False)
    _probe: BrokerProbe | None = field(default=None, repr=False)

    @property
    def probe(self) -> BrokerProbe:
        """The app's broker probe, shared by its relays and ``/healthz``."""
        if self._probe is None:
            self._probe = probe_for(self.celery_app)
        return self._probe

    @property
    def relay(self) -> Relay:
        # db.engine needs an application context, so build the relay on first use.
        if self._relay is None:
            self._relay = self.new_relay(RelayKind.SWEEP)
        return self._relay

    def new_relay(self, kind: RelayKind) -> Relay:
        return Relay(self.db.engine, self.celery_app, self.settings, kind=kind, probe=self.probe)

    def operations(self, config: Mapping[str, Any], command: str) -> Operations:
        """What the commands of :mod:`outbox.admin.cli` operate on, for this app (inside its
        application context)."""
        return Operations(
            engine=self.db.engine,
            celery_app=self.celery_app,
            settings=self.settings,
            config=config,
            command=command,
            probe_factory=lambda: self.probe,
        )


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
        uri = app.config.get("SQLALCHEMY_DATABASE_URI")
        if uri:
            # Refused here, when the app starts, rather than at the relay's first batch
            # after the web app has been writing rows nobody can publish.
            store_named(make_url(uri).get_backend_name())
        settings = OutboxSettings.from_mapping(app.config)
        app.extensions[EXTENSION_NAME] = _OutboxState(
            db=db,
            celery_app=celery_app,
            settings=settings,
            tasks=TaskOutbox(celery_app, default_session=lambda: db.session, settings=settings),
        )
        app.cli.add_command(outbox_cli)

    def track_lifecycle(self, app: Flask) -> LifecycleTracker | None:
        """In a worker: record each outbox task's outcome on its row
        (``outbox.consumers.lifecycle``).

        Call it from Celery's ``worker_init`` signal. Returns the connected tracker, or
        ``None`` when ``OUTBOX_TRACK_LIFECYCLE`` is off. The engine is looked up at the
        first task, in the process that runs it.
        """
        state: _OutboxState = app.extensions[EXTENSION_NAME]
        if not state.settings.track_lifecycle:
            return None

        def engine() -> Any:
            with app.app_context():
                return state.db.engine

        return LifecycleTracker(engine, track_started=state.settings.track_started).connect()

    @property
    def state(self) -> _OutboxState:
        state: _OutboxState = current_app.extensions[EXTENSION_NAME]
        return state

    @property
    def tasks(self) -> TaskOutbox:
        """The current app's framework-agnostic outbox (needs an application context)."""
        return self.state.tasks

    @property
    def relay(self) -> Relay:
        """The current app's relay, as the beat sweep runs it (needs an application
        context); ``flask outbox relay`` runs one of its own."""
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
        ordering_key: str | None = None,
        **options: Any,
    ) -> AsyncResult[Any]:
        """``task.apply_async(...)`` through the outbox; see :meth:`TaskOutbox.apply_async`.

        Invisible until the session (``db.session`` by default) commits, gone if it rolls
        back. With ``ordering_key``, it runs after the key's earlier tasks have finished.
        """
        return self.state.tasks.apply_async(
            task, args, kwargs, session=session, ordering_key=ordering_key, **options
        )

    def enqueue(
        self,
        signature: Signature[Any],
        /,
        *,
        session: SessionLike | None = None,
        ordering_key: str | None = None,
    ) -> AsyncResult[Any]:
        """Enqueue a signature through the outbox; invisible until commit, gone on rollback."""
        return self.state.tasks.enqueue(signature, session=session, ordering_key=ordering_key)

    def ordered(self, ordering_key: str) -> OrderedOutbox:
        """The outbox with every task enqueued under ``ordering_key``, in ``db.session``:
        ``outbox.ordered(f"order:{order.id}").delay(notify_customer, order.id)``."""
        return self.state.tasks.ordered(ordering_key)

    @overload
    def idempotent(self, function: Callable[P, R], /) -> Callable[P, R | None]: ...

    @overload
    def idempotent(
        self, /, *, transient_retries: int
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]: ...

    def idempotent(
        self,
        function: Callable[..., Any] | None = None,
        /,
        *,
        transient_retries: int = DEFAULT_TRANSIENT_RETRIES,
    ) -> Any:
        """Decorate a task function so its ``db.session`` effects apply once per task id.

        ``@outbox.idempotent``, or ``@outbox.idempotent(transient_retries=3)``. See
        :func:`outbox.idempotent`; the wrapped function must not commit.
        """
        decorate = idempotent(lambda: self.state.db.session, transient_retries=transient_retries)
        return decorate if function is None else decorate(function)

    def create_tables(self) -> None:
        """Create the outbox table in the app's database if it does not exist."""
        create_tables(self.state.db.engine)


@click.group("outbox")
@click.pass_context
@with_appcontext
def outbox_cli(ctx: click.Context) -> None:
    """Inspect and operate the task outbox."""
    state: _OutboxState = current_app.extensions[EXTENSION_NAME]
    # Named as users type it, whatever the script that runs the app's CLI is called.
    ctx.obj = state.operations(current_app.config, "flask outbox")


for _command in COMMANDS:
    outbox_cli.add_command(_command)
