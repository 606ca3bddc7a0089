"""``flask --app webapp accidents``: the three accidents of ``.delay()``, then the outbox.

Each scenario runs twice on the same stage (``stage``): once the way a view calls Celery
today (commit, then ``.delay()``), once through the outbox (the task is a row in the
same transaction, published by the relay). The faults are real: the demo's broker
refuses connections, or takes a message and loses the answer (``broker``); the workers
are a real Celery worker's four threads. The table counts what the tasks did.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from webapp.accidents.scenarios import SCENARIOS
from webapp.accidents.stage import WORKER_THREADS, Stage

#: Orders per scenario.
ORDERS = {"lost_send": 5, "double_send": 5, "broken_order": 30}
#: The longest simulated send of the broken-order scenario, in milliseconds.
LATENCY_MS = 20.0

WHAT_HAPPENS = {
    "lost_send": "the broker is down when the order commits",
    "double_send": "the broker takes the message, its answer is lost, the publish is retried",
    "broken_order": (
        f"confirmed, shipped, delivered back to back; {WORKER_THREADS} worker threads, "
        f"0 to {LATENCY_MS:g} ms a send, one first notice in five retried"
    ),
}
COUNTED = {
    "lost_send": "notices lost",
    "double_send": "notices applied twice",
    "broken_order": "notices applied out of order",
}


@click.command("accidents")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as one JSON object.")
def accidents_command(as_json: bool) -> None:
    """Reproduce the lost, double and out-of-order send with .delay(), then prevent each
    with the outbox. Runs embedded, in a temporary folder; needs no server."""
    started = time.monotonic()
    console = Console(stderr=True)
    results: dict[str, dict[str, Any]] = {}
    with _quiet(), _embedded(), tempfile.TemporaryDirectory(prefix="accidents-") as folder:
        stage = Stage(Path(folder), latency_ms=LATENCY_MS)
        with stage.running():
            for name, scenario in SCENARIOS.items():
                if not as_json:
                    console.print(f"[dim]{name.replace('_', ' ')}: {WHAT_HAPPENS[name]} …[/]")
                scenario_started = time.monotonic()
                results[name] = scenario(stage, ORDERS[name])
                results[name]["seconds"] = round(time.monotonic() - scenario_started, 1)
    if as_json:
        click.echo(json.dumps({**results, "seconds": round(time.monotonic() - started, 1)}))
        return
    Console().print(_table(results))


def _table(results: dict[str, dict[str, Any]]) -> Table:
    table = Table(title="the three accidents, counted from what the tasks did")
    table.add_column("accident")
    table.add_column("what happens")
    table.add_column("with .delay()", justify="right")
    table.add_column("with the outbox", justify="right")
    for name, figures in results.items():
        of = figures["orders"] * figures.get("notices_per_order", 1)
        table.add_row(
            name.replace("_", " "),
            WHAT_HAPPENS[name],
            f"{figures['delay']} of {of} {COUNTED[name]}",
            f"{figures['outbox']} of {of}",
            style="bold" if figures["delay"] else None,
        )
    return table


@contextlib.contextmanager
def _embedded() -> Iterator[None]:
    """Celery lets these variables override an app's own broker and result backend: the
    demo runs on its own embedded broker whatever they say."""
    saved = {name: os.environ.pop(name) for name in _CELERY_VARIABLES if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


_CELERY_VARIABLES = ("CELERY_BROKER_URL", "CELERY_RESULT_BACKEND", "CELERY_BROKER_READ_URL")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The faults are the point: the warnings they cause would only hide the table."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        root.setLevel(level)
