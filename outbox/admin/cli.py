"""The operational command line, built from an engine and a Celery app.

``python -m outbox --app tasks relay`` runs it for any application (the database from
``--database-url``, or ``OUTBOX_DATABASE_URL`` / ``DATABASE_URL`` in the environment,
which keeps a password off the command line); ``flask outbox ...`` is the same commands
with both taken from the Flask app (:mod:`outbox.contrib.flask`). Every command finds its
:class:`Operations` in the click context, put there by whichever group runs it.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import click
from celery import Celery
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn
from rich.table import Table
from sqlalchemy import Engine, create_engine, make_url, select
from sqlalchemy.exc import ArgumentError

from outbox.admin.dead_letters import retry_dead
from outbox.clock import utcnow
from outbox.data import store_named
from outbox.data.schema import OutboxStatus, ProcessedMessage, outbox_table
from outbox.errors import OutboxError
from outbox.maintenance.heartbeat import RelayKind
from outbox.maintenance.retention import purge_outbox, purge_processed
from outbox.observability.health import DEFAULT_MAX_LAG, assess
from outbox.observability.stats import collect_stats
from outbox.ordering.keys import UnblockAction, active_keys, unblock
from outbox.postgres.slot import DEFAULT_PUBLICATION, DEFAULT_SLOT, CdcSlot
from outbox.relays.batch import Relay
from outbox.relays.cdc import CdcRelay
from outbox.relays.loop import DEFAULT_POLL_INTERVAL
from outbox.relays.runner import RelayProcess
from outbox.settings import OutboxSettings, parse_duration
from outbox.transports import BrokerProbe, probe_for

logger = logging.getLogger(__name__)


@dataclass
class Operations:
    """What the commands operate on: the outbox's database, the app that publishes, the
    settings, and the few other keys they read (``OUTBOX_FLOWER_URL``,
    ``OUTBOX_HEALTH_MAX_LAG``)."""

    engine: Engine
    celery_app: Celery
    settings: OutboxSettings = field(default_factory=OutboxSettings)
    config: Mapping[str, Any] = field(default_factory=dict)
    #: How users invoke the group, for messages that name another command.
    command: str = "python -m outbox"
    probe_factory: Callable[[], BrokerProbe] | None = None
    _probe: BrokerProbe | None = field(default=None, repr=False)

    @property
    def probe(self) -> BrokerProbe:
        if self._probe is None:
            factory = self.probe_factory or (lambda: probe_for(self.celery_app))
            self._probe = factory()
        return self._probe

    def new_relay(self, kind: RelayKind) -> Relay:
        return Relay(self.engine, self.celery_app, self.settings, kind=kind, probe=self.probe)


pass_operations = click.make_pass_decorator(Operations)


def flower_task_url(config: Mapping[str, Any], task_id: object) -> str | None:
    """The task's page in Flower when ``OUTBOX_FLOWER_URL`` is set, else ``None``."""
    flower = config.get("OUTBOX_FLOWER_URL")
    return f"{str(flower).rstrip('/')}/task/{task_id}" if flower else None


@click.command("relay")
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
@click.option(
    "--cdc",
    is_flag=True,
    help="PostgreSQL: stream committed enqueues from a logical replication slot (needs "
    "wal_level=logical and a role with REPLICATION), polling only for the rest.",
)
@pass_operations
def relay_command(
    ops: Operations,
    poll_interval: float,
    metrics_port: int | None,
    heartbeat: Path | None,
    cdc: bool,
) -> None:
    """Publish committed tasks as they commit (LISTEN/NOTIFY on PostgreSQL), until SIGTERM."""
    process = RelayProcess(
        ops.new_relay(RelayKind.RELAY),
        poll_interval=poll_interval,
        stream=(
            CdcRelay(ops.engine, ops.celery_app, ops.settings, probe=ops.probe) if cdc else None
        ),
        drop_slot_command=f"{ops.command} cdc drop-slot",
        metrics_port=metrics_port,
        heartbeat_file=heartbeat,
        say=click.echo,
        complain=lambda line: click.echo(line, err=True),
    )
    try:
        process.run()
    except OutboxError as e:
        raise click.ClickException(str(e)) from e


@click.group("cdc")
def cdc_group() -> None:
    """The CDC relay's replication slot (PostgreSQL)."""


@cdc_group.command("drop-slot")
@click.option("--slot", default=DEFAULT_SLOT, show_default=True)
@click.option("--publication", default=DEFAULT_PUBLICATION, show_default=True)
@pass_operations
def drop_slot_command(ops: Operations, slot: str, publication: str) -> None:
    """Drop the slot and publication, ending any relay streaming from them; the WAL the
    slot kept is released. Pending rows stay pending: polling publishes them."""
    try:
        dropped = CdcSlot(ops.engine, slot, publication).drop()
    except ValueError as e:
        raise click.BadParameter(str(e)) from e
    if dropped:
        click.echo(f"dropped replication slot {slot} and publication {publication}")
    else:
        click.echo(f"no replication slot {slot}; publication {publication} dropped if it existed")


@click.command("retry-dead")
@click.option("--task-name", help="Only dead rows of this task.")
@click.option(
    "--id",
    "row_ids",
    multiple=True,
    help="A row id or task id to revive; repeat for several.",
)
@pass_operations
def retry_dead_command(ops: Operations, task_name: str | None, row_ids: tuple[str, ...]) -> None:
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
    with ops.engine.begin() as conn:
        revived = retry_dead(conn, utcnow(), task_name=task_name, ids=ids, task_ids=task_ids)
    click.echo(f"{revived} dead row(s) back to pending")


@click.command("purge")
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
@pass_operations
def purge_command(
    ops: Operations, older_than: str, statuses: tuple[str, ...], processed: bool
) -> None:
    """Delete old outbox rows in small batches (each its own short transaction)."""
    try:
        cutoff = utcnow() - parse_duration(older_than)
    except OutboxError as e:
        raise click.BadParameter(str(e), param_hint="--older-than") from e
    if processed and utcnow() - cutoff <= timedelta(seconds=ops.settings.confirm_timeout):
        raise click.BadParameter(
            f"{older_than!r} is not longer than OUTBOX_CONFIRM_TIMEOUT "
            f"({ops.settings.confirm_timeout:g}s): a processed id forgotten that early would "
            "be applied again when its task is redelivered.",
            param_hint="--older-than",
        )
    engine = ops.engine
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


@click.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@pass_operations
def status_command(ops: Operations, as_json: bool) -> None:
    """Pending, due and dead rows, lag, and whether a relay is running."""
    stats = collect_stats(ops.engine, utcnow())
    max_lag = float(ops.config.get("OUTBOX_HEALTH_MAX_LAG", DEFAULT_MAX_LAG))
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
            f"{stats.oldest_blocked_age_seconds or 0.0:.0f}s: `{ops.command} keys --blocked` "
            f"lists them, `{ops.command} unblock KEY --retry|--skip` resolves one"
        )
    for relay in stats.relays:
        console.print(f"{relay.name} last ran {relay.last_seen_seconds_ago:.1f}s ago")
    slot = stats.cdc_slot
    if slot is not None:
        who = "a CDC relay streams from it" if slot.active else "no CDC relay streams from it"
        lag = "" if slot.lag_seconds is None else f", {slot.lag_seconds:.1f}s"
        console.print(
            f"CDC slot {slot.name}: {who}; behind by {slot.lag_bytes or 0:,} bytes of WAL{lag}"
            f" (WAL {slot.wal_status or 'unknown'})"
        )
    for problem in health.problems:
        console.print(f"[bold red]{problem}[/]")


@click.command("keys")
@click.option("--blocked", is_flag=True, help="Only the keys stopped at a failed task.")
@click.option("--limit", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON list instead of a table.")
@pass_operations
def keys_command(ops: Operations, blocked: bool, limit: int, as_json: bool) -> None:
    """Ordering keys a task holds: that task, and how many wait behind it."""
    with ops.engine.connect() as conn:
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


@click.command("unblock")
@click.argument("key")
@click.option("--retry", "action", flag_value=UnblockAction.RETRY.value, help="Run its task again.")
@click.option("--skip", "action", flag_value=UnblockAction.SKIP.value, help="Let the next one go.")
@pass_operations
def unblock_command(ops: Operations, key: str, action: str | None) -> None:
    """Resolve a blocked ordering key: run its failed task again, or skip it."""
    if action is None:
        raise click.UsageError("say what to do with the key's failed task: --retry or --skip.")
    try:
        with ops.engine.begin() as conn:
            done = unblock(conn, key, UnblockAction(action), utcnow())
    except OutboxError as e:
        raise click.ClickException(str(e)) from e
    click.echo(done)


@click.command("inspect")
@click.argument("task_id", type=click.UUID)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
@pass_operations
def inspect_command(ops: Operations, task_id: uuid.UUID, as_json: bool) -> None:
    """One task's outbox row: status, attempts, errors, confirmation, what the worker
    reported (lifecycle), and its Flower page."""
    with ops.engine.connect() as conn:
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
        "flower_url": flower_task_url(ops.config, task_id),
    }
    if as_json:
        click.echo(json.dumps(details))
        return
    table = Table(title=f"task {task_id}", show_header=False)
    for key, value in details.items():
        table.add_row(key, "" if value is None else str(value))
    Console().print(table)


#: Every operational command, in the order ``--help`` lists them.
COMMANDS = (
    relay_command,
    cdc_group,
    status_command,
    inspect_command,
    keys_command,
    unblock_command,
    retry_dead_command,
    purge_command,
)


def load_celery_app(name: str) -> Celery:
    """The Celery app ``name`` names, as ``celery -A`` finds it (``tasks``,
    ``proj.celery:app``)."""
    from celery.app.utils import find_app

    try:
        app = find_app(name)
    except Exception as e:  # an import error, or a module without an app
        raise click.BadParameter(f"cannot load a Celery app from {name!r}: {e}") from e
    if not isinstance(app, Celery):
        raise click.BadParameter(f"{name!r} is not a Celery app but {app!r}")
    return app


@click.group("outbox")
@click.option(
    "-A",
    "--app",
    "app_name",
    required=True,
    envvar="OUTBOX_CELERY_APP",
    show_envvar=True,
    help="The Celery app, as for `celery -A` (e.g. tasks or proj.celery:app).",
)
@click.option(
    "--database-url",
    envvar=["OUTBOX_DATABASE_URL", "DATABASE_URL"],
    show_envvar=True,
    required=True,
    help="The database holding the outbox's tables; better given as OUTBOX_DATABASE_URL "
    "or DATABASE_URL in the environment, which keeps a password out of `ps`.",
)
@click.pass_context
def main(ctx: click.Context, app_name: str, database_url: str) -> None:
    """Inspect and operate the task outbox of any application (no Flask needed).

    Settings come from OUTBOX_* environment variables, as the Flask extension reads them
    from its config."""
    try:
        # Before an engine: a database the outbox cannot run on is refused even where
        # its driver is not installed.
        store_named(make_url(database_url).get_backend_name())
    except ArgumentError as e:
        raise click.BadParameter(f"not a database URL: {e}", param_hint="--database-url") from e
    except OutboxError as e:
        raise click.ClickException(str(e)) from e
    engine = create_engine(database_url, pool_pre_ping=True)
    ctx.call_on_close(engine.dispose)
    config = {key: value for key, value in os.environ.items() if key.startswith("OUTBOX_")}
    try:
        settings = OutboxSettings.from_mapping(config)
    except OutboxError as e:
        raise click.ClickException(str(e)) from e
    ctx.obj = Operations(
        engine=engine,
        celery_app=load_celery_app(app_name),
        settings=settings,
        config=config,
        command=ctx.command_path,
    )


for _command in COMMANDS:
    main.add_command(_command)


__all__ = ["COMMANDS", "Operations", "flower_task_url", "main", "pass_operations"]
