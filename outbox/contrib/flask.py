"""Flask extension: ``Outbox(app, db)`` and the ``flask outbox`` command group."""

from __future__ import annotations

import json
import logging
import signal
import threading
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, ParamSpec, TypeVar, overload

import click
from celery import Celery
from celery.canvas import Signature
from celery.result import AsyncResult, _set_task_join_will_block  # type: ignore[attr-defined]
from flask import Flask, current_app
from flask.cli import with_appcontext
from prometheus_client import start_http_server
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn
from rich.table import Table
from sqlalchemy import select

from outbox.brokers import BrokerProbe, probe_for
from outbox.clock import utcnow
from outbox.dead_letters import retry_dead
from outbox.enqueue import OrderedOutbox, SessionLike, TaskOutbox, TaskRef
from outbox.errors import OutboxError
from outbox.health import DEFAULT_MAX_LAG, assess
from outbox.heartbeat import RelayKind
from outbox.idempotency import DEFAULT_TRANSIENT_RETRIES, ProcessedMessage, idempotent
from outbox.lifecycle import LifecycleTracker
from outbox.metrics import register_outbox_collector
from outbox.ordering import UnblockAction, active_keys, unblock
from outbox.relay import DrainResult, Relay
from outbox.relay_loop import DEFAULT_POLL_INTERVAL, RelayLoop
from outbox.retention import purge_outbox, purge_processed
from outbox.schema import OutboxStatus, create_tables, outbox_table
from outbox.settings import OutboxSettings, parse_duration
from outbox.stats import collect_stats

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
        settings = OutboxSettings.from_mapping(app.config)
        app.extensions[EXTENSION_NAME] = _OutboxState(
            db=db,
            celery_app=celery_app,
            settings=settings,
            tasks=TaskOutbox(celery_app, default_session=lambda: db.session, settings=settings),
        )
        app.cli.add_command(outbox_cli)

    def track_lifecycle(self, app: Flask) -> LifecycleTracker | None:
        """In a worker: record each outbox task's outcome on its row (``outbox.lifecycle``).

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
def outbox_cli() -> None:
    """Inspect and operate the task outbox."""


@outbox_cli.command("relay")
@click.option(
    "--poll-interval",
    type=click.FloatRange(min=0.01),
    default=DEFAULT_POLL_INTERVAL,
    show_default=True,
    help="Seconds between polls when no notification arrives.",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(min=1, max=65535),
    help="Serve Prometheus metrics (publish counters, dispatch lag, backlog) on this port.",
)
@click.option(
    "--heartbeat",
    type=click.Path(dir_okay=False, path_type=Path),
    help="A file touched after every drain, for liveness probes (its age is the loop's).",
)
@with_appcontext
def relay_command(poll_interval: float, metrics_port: int | None, heartbeat: Path | None) -> None:
    """Publish committed tasks as they commit (LISTEN/NOTIFY on PostgreSQL), until SIGTERM."""
    if not logging.getLogger().handlers:
        # A process of its own: show what it does (a host app may configure logging first).
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
    state: _OutboxState = current_app.extensions[EXTENSION_NAME]
    relay = state.new_relay(RelayKind.RELAY)
    # Like a worker, this process never waits for task results: without this, Celery
    # subscribes it to every published task's result channel (Redis result backend)
    # and the subscriptions only ever grow.
    _set_task_join_will_block(True)

    def on_drain(result: DrainResult) -> None:
        if heartbeat is not None:
            heartbeat.touch()
        if result.published or result.failed:
            logger.info(
                "relay: published %d, failed %d (dead %d)",
                result.published,
                result.failed,
                result.dead,
            )

    loop = RelayLoop(relay, poll_interval=poll_interval)
    if metrics_port is not None:
        register_outbox_collector(lambda: relay.engine, relay.now)
        start_http_server(metrics_port)
        click.echo(f"relay: metrics on http://0.0.0.0:{metrics_port}/metrics")

    def stop(signum: int, _frame: object) -> None:
        # Work that takes locks or writes to stdout does not belong in a signal handler:
        # hand it to a thread.
        def stop_loop() -> None:
            click.echo(
                f"relay: {signal.Signals(signum).name} received, finishing the current batch"
            )
            loop.stop()

        threading.Thread(target=stop_loop, name="relay-stop").start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    click.echo(
        "relay: publishing from "
        f"{relay.engine.url.render_as_string(hide_password=True)} to {relay.probe.name}"
    )
    loop.run(
        on_drain=on_drain,
        on_ready=lambda how: click.echo(f"relay: ready, waiting for commits ({how})"),
    )
    click.echo("relay: stopped")


def flower_task_url(config: Mapping[str, Any], task_id: object) -> str | None:
    """The task's page in Flower when ``OUTBOX_FLOWER_URL`` is set, else ``None``."""
    flower = config.get("OUTBOX_FLOWER_URL")
    return f"{str(flower).rstrip('/')}/task/{task_id}" if flower else None


@outbox_cli.command("retry-dead")
@click.option("--task-name", help="Only dead rows of this task.")
@click.option(
    "--id",
    "row_ids",
    multiple=True,
    help="A row id or task id to revive; repeat for several.",
)
@with_appcontext
def retry_dead_command(task_name: str | None, row_ids: tuple[str, ...]) -> None:
    """Put dead rows back to pending with attempts reset; they keep their task ids."""
    ids: list[int] = []
    task_ids: list[uuid.UUID] = []
    for raw in row_ids:
        if raw.isdigit():
            ids.append(int(raw))
            continue
        try:
            task_ids.append(uuid.UUID(raw))
        except ValueError as e:
            raise click.BadParameter(
                f"{raw!r} is neither a row id nor a task id (UUID).", param_hint="--id"
            ) from e
    state: _OutboxState = current_app.extensions[EXTENSION_NAME]
    with state.db.engine.begin() as conn:
        revived = retry_dead(conn, utcnow(), task_name=task_name, ids=ids, task_ids=task_ids)
    click.echo(f"{revived} dead row(s) back to pending")


@outbox_cli.command("purge")
@click.option(
    "--older-than",
    "older_than",
    required=True,
    help="Age of the rows to delete: 7d, 12h, 30m, 45s or 2w.",
)
@click.option(
    "--status",
    "statuses",
    multiple=True,
    type=click.Choice([OutboxStatus.DISPATCHED.value, OutboxStatus.DEAD.value]),
    default=[OutboxStatus.DISPATCHED.value],
    show_default=True,
    help="Which rows to delete; repeat for several. Pending rows are never purged.",
)
@click.option(
    "--processed/--no-processed",
    default=False,
    help="Also forget processed task ids recorded before the same cut-off.",
)
@with_appcontext
def purge_command(older_than: str, statuses: tuple[str, ...], processed: bool) -> None:
    """Delete old outbox rows in small batches (each its own short transaction)."""
    try:
        cutoff = utcnow() - parse_duration(older_than)
    except OutboxError as e:
        raise click.BadParameter(str(e), param_hint="--older-than") from e
    state: _OutboxState = current_app.extensions[EXTENSION_NAME]
    if processed and utcnow() - cutoff <= timedelta(seconds=state.settings.confirm_timeout):
        raise click.BadParameter(
            f"{older_than!r} is not longer than OUTBOX_CONFIRM_TIMEOUT "
            f"({state.settings.confirm_timeout:g}s): a processed id forgotten that early would "
            "be applied again when its task is redelivered.",
            param_hint="--older-than",
        )
    engine = state.db.engine
    with Progress(
        SpinnerColumn(), TextColumn("{task.description}"), TextColumn("{task.completed} rows")
    ) as progress:
        rows = progress.add_task(f"deleting {', '.join(statuses)} rows before {cutoff:%F %T}")
        deleted = purge_outbox(
            engine,
            cutoff,
            statuses=[OutboxStatus(status) for status in statuses],
            progress=lambda n: progress.advance(rows, n),
        )
        forgotten = 0
        if processed:
            ids = progress.add_task("forgetting processed task ids")
            forgotten = purge_processed(engine, cutoff, progress=lambda n: progress.advance(ids, n))
    summary = f"deleted {deleted} outbox row(s)"
    if processed:
        summary += f", forgot {forgotten} processed task id(s)"
    click.echo(summary)


@outbox_cli.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@with_appcontext
def status_command(as_json: bool) -> None:
    """Pending, due and dead rows, lag, and whether a relay is running."""
    state: _OutboxState = current_app.extensions[EXTENSION_NAME]
    stats = collect_stats(state.db.engine, utcnow())
    max_lag = float(current_app.config.get("OUTBOX_HEALTH_MAX_LAG", DEFAULT_MAX_LAG))
    health = assess(stats, max_lag)
    if as_json:
        click.echo(json.dumps({**stats.as_dict(), "problems": health.problems}))
        return
    table = Table(title="celery-outbox")
    table.add_column("status")
    table.add_column("rows", justify="right")
    table.add_row("pending", str(stats.pending))
    table.add_row("  of which due", str(stats.due))
    table.add_row("dispatched (estimate)", f"~{stats.dispatched_estimate}")
    table.add_row("dead", str(stats.dead), style="red" if stats.dead else None)
    console = Console()
    console.print(table)
    if stats.by_task:
        per_task = Table(title="pending and dead per task")
        per_task.add_column("task")
        statuses = [str(OutboxStatus.PENDING), str(OutboxStatus.DEAD)]
        for status in statuses:
            per_task.add_column(status, justify="right")
        for name, counts in sorted(stats.by_task.items()):
            per_task.add_row(name, *(str(counts.get(status, 0)) for status in statuses))
        console.print(per_task)
    age = stats.oldest_pending_age_seconds
    console.print("oldest due pending row: " + ("none" if age is None else f"{age:.1f}s overdue"))
    console.print(f"dispatched in the last minute: {stats.dispatched_last_minute}")
    if stats.blocked_keys:
        console.print(
            f"[bold red]{stats.blocked_keys} ordering key(s) blocked[/], the oldest for "
            f"{stats.oldest_blocked_age_seconds or 0.0:.0f}s: `flask outbox keys --blocked` "
            "lists them, `flask outbox unblock KEY --retry|--skip` resolves one"
        )
    for relay in stats.relays:
        console.print(f"{relay.name} last ran {relay.last_seen_seconds_ago:.1f}s ago")
    for problem in health.problems:
        console.print(f"[bold red]{problem}[/]")


@outbox_cli.command("keys")
@click.option("--blocked", is_flag=True, help="Only the keys stopped at a failed task.")
@click.option("--limit", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON list instead of a table.")
@with_appcontext
def keys_command(blocked: bool, limit: int, as_json: bool) -> None:
    """Ordering keys a task holds: that task, and how many wait behind it."""
    state: _OutboxState = current_app.extensions[EXTENSION_NAME]
    with state.db.engine.connect() as conn:
        keys = active_keys(conn, blocked_only=blocked, limit=limit)
    if as_json:
        click.echo(json.dumps([key.as_dict() for key in keys]))
        return
    if not keys:
        click.echo("no blocked ordering key" if blocked else "no ordering key is busy")
        return
    table = Table(title="blocked ordering keys" if blocked else "busy ordering keys")
    for column in ("key", "task", "task id", "status", "since", "held behind", "why blocked"):
        table.add_column(column)
    for key in keys:
        since = key.blocked_at or key.head_since
        table.add_row(
            key.key,
            f"{key.head_seq}: {key.task_name or '(purged)'}",
            key.task_id or "",
            key.status or "",
            f"{since:%F %T}" if since else "",
            str(key.held),
            key.blocked_reason or "",
        )
    Console().print(table)


@outbox_cli.command("unblock")
@click.argument("key")
@click.option("--retry", "action", flag_value=UnblockAction.RETRY.value, help="Run its task again.")
@click.option("--skip", "action", flag_value=UnblockAction.SKIP.value, help="Let the next one go.")
@with_appcontext
def unblock_command(key: str, action: str | None) -> None:
    """Resolve a blocked ordering key: run its failed task again, or skip it."""
    if action is None:
        raise click.UsageError("say what to do with the key's failed task: --retry or --skip.")
    state: _OutboxState = current_app.extensions[EXTENSION_NAME]
    try:
        with state.db.engine.begin() as conn:
            done = unblock(conn, key, UnblockAction(action), utcnow())
    except OutboxError as e:
        raise click.ClickException(str(e)) from e
    click.echo(done)


@outbox_cli.command("inspect")
@click.argument("task_id", type=click.UUID)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
@with_appcontext
def inspect_command(task_id: uuid.UUID, as_json: bool) -> None:
    """One task's outbox row: status, attempts, errors, confirmation, what the worker
    reported (lifecycle), and its Flower page."""
    state: _OutboxState = current_app.extensions[EXTENSION_NAME]
    with state.db.engine.connect() as conn:
        row = conn.execute(
            select(outbox_table).where(outbox_table.c.task_id == task_id)
        ).one_or_none()
        processed = conn.execute(
            select(ProcessedMessage.processed_at).where(ProcessedMessage.task_id == str(task_id))
        ).scalar_one_or_none()
    if row is None:
        raise click.ClickException(f"no outbox row has task id {task_id}.")
    details: dict[str, Any] = {
        "task_id": str(task_id),
        "row_id": row.id,
        "task_name": row.task_name,
        "status": str(OutboxStatus(row.status)),
        "attempts": row.attempts,
        "deliveries": row.deliveries,
        "last_error": row.last_error,
        "args": row.args,
        "kwargs": row.kwargs,
        "options": row.options,
        "created_at": row.created_at.isoformat(),
        "available_at": row.available_at.isoformat(),
        "dispatched_at": row.dispatched_at.isoformat() if row.dispatched_at else None,
        "awaiting_confirmation_until": (
            row.confirm_deadline.isoformat() if row.confirm_deadline else None
        ),
        "processed_at": processed.isoformat() if processed else None,
        "task_state": row.task_state,
        "task_runs": row.task_runs,
        "task_started_at": row.task_started_at.isoformat() if row.task_started_at else None,
        "task_finished_at": row.task_finished_at.isoformat() if row.task_finished_at else None,
        "task_error": row.task_error,
        "task_retry_eta": row.task_retry_eta.isoformat() if row.task_retry_eta else None,
        "ordering_key": row.ordering_key,
        "ordering_seq": row.ordering_seq,
        "flower_url": flower_task_url(current_app.config, task_id),
    }
    if as_json:
        click.echo(json.dumps(details))
        return
    table = Table(title=f"task {task_id}", show_header=False)
    for key, value in details.items():
        table.add_row(key, "" if value is None else str(value))
    Console().print(table)
