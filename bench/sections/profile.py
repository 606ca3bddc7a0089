"""Where a relay drain spends its time: per message in a big drain, per drain in small ones.

Measured in this process through the relay's public API only:

- **The split** (no profiler, so nothing is inflated): SQLAlchemy's events time every
  statement from ``Connection.execute`` (so its compilation counts) to the cursor's
  return, told apart by their SQL. The claim is the ``SELECT ... FOR UPDATE SKIP
  LOCKED``; the mark is the ``UPDATE`` that sets ``dispatched_at``; "publish" is
  everything between a claim's return and its mark's execution: decoding the claimed
  rows (psycopg converts JSONB, UUIDs and timestamps as rows are fetched), Celery and
  kombu building the messages, the Redis round trip, and building the mark statement;
  "commit" runs from a COMMIT to the next statement; "other SQL" is the rest of the
  statements (the redelivery check); "rest" is what no part covers (Python before the
  first statement and between the others). Made for a drain of ``profile_rows`` rows
  (µs per message), and for drains that each find a single due row (µs per drain): the
  fixed cost the relay process pays every time a commit wakes it, the floor under its
  latency. "Other SQL" is timed only to tell the rest from it, and the rest is
  reported only for the one-row drains.
- **cProfile** of one more big drain: the functions on the publish path, µs per message.
"""

from __future__ import annotations

import cProfile
import pstats
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.table import Table
from sqlalchemy import Engine, create_engine, event

from bench.celery_app import result_subscriptions
from bench.children import ROOT
from bench.context import Context
from bench.data import add_pending, count_status, empty_queue, empty_tables
from bench.results import Figure, median
from outbox import OutboxSettings, Relay

SECTION = "profile"
CLAIM, PUBLISH, MARK, COMMIT, OTHER, REST, TOTAL = (
    "claim statement",
    "publish (decode rows, build, send)",
    "mark dispatched",
    "commit",
    "other SQL (redelivery check)",
    "rest (Python between statements)",
    "whole drain",
)
PARTS = (CLAIM, PUBLISH, MARK, COMMIT, OTHER, REST, TOTAL)
#: The parts reported for a big drain, and for a one-row drain.
BIG_PARTS = (CLAIM, PUBLISH, MARK, COMMIT, TOTAL)
SINGLE_PARTS = (CLAIM, PUBLISH, MARK, COMMIT, REST, TOTAL)
#: The functions on the publish path: (file name ending, function name).
PUBLISH_PATH = (
    ("outbox/transports/kombu.py", "_hand_over"),
    ("outbox/transports/messages.py", "build"),
    ("outbox/enqueue/serialization.py", "from_wire"),
    ("celery/app/routes.py", "route"),
    ("celery/app/amqp.py", "as_task_v2"),
    ("celery/utils/saferepr.py", "saferepr"),
    ("kombu/messaging.py", "publish"),
    ("kombu/abstract.py", "__copy__"),
    ("kombu/serialization.py", "dumps"),
    ("celery/events/dispatcher.py", "send"),
    ("celery/events/dispatcher.py", "publish"),
    ("redis/client.py", "execute"),
)


def run(ctx: Context) -> list[Figure]:
    rows = ctx.sizes.profile_rows
    drains = ctx.sizes.single_drains
    settings = OutboxSettings()
    engine = create_engine(ctx.services.database_url)
    relay = Relay(engine, ctx.celery_app, settings)
    big: list[dict[str, float]] = []
    single: list[dict[str, float]] = []
    profile = cProfile.Profile()
    # As in the relay command and a worker running the sweep: no result subscriptions.
    try:
        with result_subscriptions(False):
            _drain(ctx, relay, 2 * settings.batch_size)  # connections, producer pool, queue
            for run_index in range(ctx.repeats):
                ctx.say(f"profile: run {run_index + 1}/{ctx.repeats}: a drain of {rows:,} rows")
                with _timeline(engine) as timeline:
                    _drain(ctx, relay, rows, timeline=timeline)
                big.append(timeline.split(rows))
                ctx.say(f"profile: run {run_index + 1}/{ctx.repeats}: {drains} one-row drains")
                splits = []
                for _ in range(drains):
                    with _timeline(engine) as timeline:
                        _drain(ctx, relay, 1, timeline=timeline)
                    splits.append(timeline.split(1))
                single.append({name: median([split[name] for split in splits]) for name in PARTS})
            ctx.say(f"profile: cProfile of a drain of {rows:,} rows")
            _drain(ctx, relay, rows, profile=profile)
    finally:
        engine.dispose()
    ctx.extra["profile"] = {"publish_path": _publish_path(ctx, pstats.Stats(profile), rows)}
    big_note = f"drain of {rows:,} rows, batch size {settings.batch_size}, no profiler"
    single_note = f"median of {drains} drains finding one due row each"
    return [
        *(
            Figure(
                SECTION,
                name,
                "µs/msg",
                [split[name] for split in big],
                note=big_note if name == BIG_PARTS[0] else "",
            )
            for name in BIG_PARTS
        ),
        *(
            Figure(
                SECTION,
                f"one-row drain: {name}",
                "µs/drain",
                [split[name] for split in single],
                note=single_note if name == SINGLE_PARTS[0] else "",
            )
            for name in SINGLE_PARTS
        ),
    ]


def _drain(
    ctx: Context,
    relay: Relay,
    rows: int,
    *,
    timeline: _Timeline | None = None,
    profile: cProfile.Profile | None = None,
) -> None:
    """Fill ``rows`` pending rows and drain until nothing is due, timed or profiled."""
    empty_tables(ctx.engine)
    empty_queue(ctx.redis)
    # Small fills happen hundreds of times: ANALYZE each time would dominate the section.
    add_pending(ctx.engine, rows, analyze_after=rows > 1)
    if timeline is not None:
        timeline.start = time.perf_counter()
    if profile is not None:
        profile.enable()
    published = 0
    while (batch := relay.drain(max_seconds=3600).published) and published + batch < rows:
        published += batch
    if profile is not None:
        profile.disable()
    if timeline is not None:
        timeline.end = time.perf_counter()
    left = count_status(ctx.engine, "pending")
    if left:
        raise RuntimeError(f"{left} of {rows} rows still pending after the drain")


@dataclass
class _Timeline:
    """Every statement's start and end, and every COMMIT, in order."""

    events: list[tuple[str, float, float]] = field(default_factory=list)
    start: float = 0.0
    end: float = 0.0

    def split(self, rows: int) -> dict[str, float]:
        """The drain's time by part, in µs per message."""
        parts = dict.fromkeys(PARTS, 0.0)
        events = self.events
        for index, (kind, began, ended) in enumerate(events):
            following = events[index + 1][1] if index + 1 < len(events) else self.end
            if kind == CLAIM:
                parts[CLAIM] += ended - began
                if index + 1 < len(events) and events[index + 1][0] == MARK:
                    parts[PUBLISH] += following - ended
            elif kind == COMMIT:
                parts[COMMIT] += following - began
            else:
                parts[kind] += ended - began
        parts[TOTAL] = self.end - self.start
        parts[REST] = parts[TOTAL] - sum(parts[name] for name in PARTS[:-2])
        return {name: seconds / rows * 1e6 for name, seconds in parts.items()}


@contextmanager
def _timeline(engine: Engine) -> Iterator[_Timeline]:
    timeline = _Timeline()

    def before_execute(conn: Any, *args: Any) -> None:
        conn.info["bench.execute"] = time.perf_counter()

    def before(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        # From Connection.execute when there was one, so compiling counts too.
        conn.info["bench.started"] = conn.info.pop("bench.execute", time.perf_counter())

    def after(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        ended = time.perf_counter()
        timeline.events.append((_kind(statement), conn.info.pop("bench.started"), ended))

    def commit(conn: Any) -> None:
        now = time.perf_counter()
        timeline.events.append((COMMIT, now, now))

    listeners = (
        ("before_execute", before_execute),
        ("before_cursor_execute", before),
        ("after_cursor_execute", after),
        ("commit", commit),
    )
    for name, listener in listeners:
        event.listen(engine, name, listener)
    try:
        yield timeline
    finally:
        for name, listener in listeners:
            event.remove(engine, name, listener)


def _kind(statement: str) -> str:
    if "FOR UPDATE" in statement and "SKIP LOCKED" in statement:
        return CLAIM
    if statement.lstrip().startswith("UPDATE celery_outbox") and "dispatched_at=" in statement:
        return MARK
    return OTHER


def _where(key: tuple[str, int, str]) -> str:
    """``path:line(function)`` without the machine's directories."""
    filename, line, function = key
    path = filename
    for marker in ("site-packages/", "/lib/python3."):
        if marker in path:
            path = path.split(marker, 1)[1]
            if marker.startswith("/lib"):
                path = "stdlib:" + path.split("/", 1)[1]
            break
    else:
        with suppress(ValueError):
            path = str(Path(filename).resolve().relative_to(ROOT))
    return f"{path}:{line}({function})" if line else f"{path}({function})"


def _publish_path(ctx: Context, stats: pstats.Stats, rows: int) -> list[dict[str, Any]]:
    """Print the publish path's functions, in µs per message; return them for the JSON."""
    raw: dict[tuple[str, int, str], tuple[int, int, float, float, Any]] = stats.stats  # type: ignore[attr-defined]
    entries: list[dict[str, Any]] = [
        {
            "function": _where(key),
            "calls": calls,
            "own_us_per_message": own / rows * 1e6,
            "cumulative_us_per_message": cumulative / rows * 1e6,
        }
        for suffix, function in PUBLISH_PATH
        for key, (_primitive, calls, own, cumulative, _callers) in raw.items()
        if key[0].endswith(suffix) and key[2] == function
    ]
    table = Table(title=f"cProfile, the publish path, µs per message ({rows:,} messages)")
    table.add_column("function")
    table.add_column("calls", justify="right")
    table.add_column("own", justify="right")
    table.add_column("cumulative", justify="right")
    for entry in entries:
        table.add_row(
            entry["function"],
            f"{entry['calls']:,}",
            f"{entry['own_us_per_message']:.1f}",
            f"{entry['cumulative_us_per_message']:.1f}",
        )
    ctx.out.print(table)
    return entries
