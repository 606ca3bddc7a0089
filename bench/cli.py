"""``python -m bench``: parse options, set up the services, run the sections, report.

Everything the run creates is removed however it ends: child processes are stopped by
PID, the database is dropped and the Redis DB released, on success, on an error, on
Ctrl-C and on SIGTERM.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.console import Console

from bench.children import stop_all
from bench.context import FULL, QUICK, Context, Sizes
from bench.environment import Services, ServicesUnavailableError, services
from bench.results import Figure

#: Sections in the order they run; ``profile`` only runs when asked for.
SECTIONS = (
    "request",
    "enqueue",
    "relay",
    "bare",
    "amqp",
    "batch",
    "latency",
    "wakeup",
    "wakeup_mariadb",
    "cdc",
    "fanin",
    "backlog",
    "e2e",
    "ordering",
    "probes",
    "restart",
)
PROFILE = "profile"
DEFAULT_REPEATS = 3


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=(
            "Benchmark celery-outbox against PostgreSQL and Redis (and RabbitMQ for "
            "'amqp'). Sections: "
            + ", ".join(SECTIONS)
            + f"; '{PROFILE}' (or --profile) profiles one relay drain."
        ),
    )
    parser.add_argument(
        "--only",
        type=_section_list,
        help=f"comma-separated sections to run (default: all of {','.join(SECTIONS)})",
    )
    parser.add_argument(
        "--repeats",
        type=_positive_int,
        help=f"runs per figure; each figure is their median (default {DEFAULT_REPEATS}, "
        "1 with --quick)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes and one run: a smoke test, not figures"
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="write every figure here")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="profile one relay drain (cProfile) and split its time per message; "
        "runs only that unless --only names sections too",
    )
    parser.add_argument(
        "--profile-rows", type=_positive_int, help="rows the profiled drain publishes"
    )
    return parser.parse_args(argv)


def _section_list(raw: str) -> list[str]:
    names = [name.strip() for name in raw.split(",") if name.strip()]
    unknown = [name for name in names if name not in (*SECTIONS, PROFILE)]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown section(s) {unknown or raw!r}: choose from {', '.join((*SECTIONS, PROFILE))}"
        )
    return names


def _positive_int(raw: str) -> int:
    value = int(raw)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{raw!r} must be at least 1")
    return value


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    selected = list(args.only or ([] if args.profile else SECTIONS))
    if args.profile and PROFILE not in selected:
        selected.append(PROFILE)
    sizes = QUICK if args.quick else FULL
    if args.profile_rows:
        sizes = Sizes(**{**asdict(sizes), "profile_rows": args.profile_rows})
    repeats = args.repeats or (1 if args.quick else DEFAULT_REPEATS)
    console = Console(stderr=True, log_path=False)
    # Piped into a file the table keeps its width instead of rich's 80-column default.
    piped = not sys.stdout.isatty() and "COLUMNS" not in os.environ
    out = Console(width=160 if piped else None)
    # SIGTERM ends the run like Ctrl-C does: through the clean-up below.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        with services() as found:
            try:
                return _run(found, selected, sizes, repeats, args.json, console, out)
            finally:
                # A second Ctrl-C must not cut the clean-up short.
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                stop_all()
    except ServicesUnavailableError as e:
        console.print(f"[red]{e}[/red]")
        return 2
    except KeyboardInterrupt as e:
        console.print("[yellow]interrupted: children stopped, database dropped[/yellow]")
        return 128 + (e.signum if isinstance(e, _Terminated) else signal.SIGINT)


class _Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C: a BaseException, so no ``except Exception`` in a
    library on the way swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise _Terminated(signum)


def _run(
    found: Services,
    selected: list[str],
    sizes: Sizes,
    repeats: int,
    json_path: Path | None,
    console: Console,
    out: Console,
) -> int:
    import redis
    from sqlalchemy import create_engine

    from bench.celery_app import app as celery_app
    from bench.report import machine_facts, print_table, write_json
    from outbox import OutboxSettings
    from webapp import init_db

    engine = create_engine(found.database_url)
    client = redis.Redis.from_url(found.redis_url)
    try:
        init_db(engine)
        ctx = Context(found, sizes, repeats, console, out, engine, celery_app, client)
        facts = machine_facts(engine, client)
        console.log(
            f"database {found.database}, Redis DB {found.redis_db}, {repeats} run(s) per "
            f"figure, sections: {', '.join(selected)}"
        )
        figures: list[Figure] = []
        started = time.monotonic()
        for name in selected:
            section_started = time.monotonic()
            figures.extend(_section(name)(ctx))
            ctx.extra.setdefault("seconds", {})[name] = round(time.monotonic() - section_started, 1)
        ctx.extra["seconds"]["total"] = round(time.monotonic() - started, 1)
        print_table(out, figures, facts)
        settings: dict[str, Any] = {
            "sections": selected,
            "repeats": repeats,
            "sizes": asdict(sizes),
            "outbox_defaults": asdict(OutboxSettings()),
        }
        if json_path is not None:
            write_json(json_path, figures, facts, settings, ctx.extra)
            console.log(f"figures written to {json_path}")
        return 0
    finally:
        client.close()
        engine.dispose()


def _section(name: str) -> Callable[[Context], list[Figure]]:
    """The section's ``run``, imported only now: the environment is set by then."""
    from importlib import import_module

    module = import_module(f"bench.sections.{name}")
    runner: Callable[[Context], list[Figure]] = module.run
    return runner
