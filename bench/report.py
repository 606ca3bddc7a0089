"""The results table (rich) and the JSON file."""

from __future__ import annotations

import json
import math
import os
import platform
from importlib.metadata import version
from pathlib import Path
from typing import Any

import redis
from rich.console import Console
from rich.table import Table
from sqlalchemy import Engine, text

from bench.results import RATIO, Figure

#: Distribution names; the Redis client is reported as "redis-py", beside the server.
_PACKAGES = ("celery", "kombu", "sqlalchemy", "psycopg", "redis", "flask")


def machine_facts(engine: Engine, client: redis.Redis) -> dict[str, Any]:
    """What the figures were measured on, printed above the table and stored in the JSON."""
    with engine.connect() as conn:
        postgres = conn.execute(text("SHOW server_version")).scalar_one()
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "postgresql": postgres,
        "redis": client.info("server")["redis_version"],
        **{("redis-py" if name == "redis" else name): version(name) for name in _PACKAGES},
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _number(value: float, unit: str) -> str:
    if math.isnan(value):
        return "-"
    if unit == RATIO:
        return f"{value:.2f}{RATIO}"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def print_table(console: Console, figures: list[Figure], facts: dict[str, Any]) -> None:
    console.print(
        "[bold]machine[/bold]: "
        + ", ".join(f"{key} {value}" for key, value in facts.items() if key != "cpu")
        + f"\n[bold]cpu[/bold]: {facts['cpu']}"
    )
    table = Table(title="celery-outbox benchmark (medians over runs)")
    table.add_column("section")
    table.add_column("figure")
    table.add_column("median", justify="right")
    table.add_column("unit")
    table.add_column("runs (min … max)", justify="right")
    table.add_column("target")
    table.add_column("met", justify="center")
    table.add_column("note")
    section = None
    for figure in figures:
        if section is not None and figure.section != section:
            table.add_section()
        section = figure.section
        runs = [value for value in figure.runs if not math.isnan(value)]
        spread = (
            f"{_number(min(runs), figure.unit)} … {_number(max(runs), figure.unit)} ({len(runs)})"
            if runs
            else "-"
        )
        met = {True: "[green]yes[/green]", False: "[red]no[/red]", None: ""}[figure.met]
        table.add_row(
            figure.section,
            figure.name,
            _number(figure.median, figure.unit),
            figure.unit if figure.unit != RATIO else "",
            spread,
            figure.target.text if figure.target else "",
            met,
            figure.note,
        )
    console.print(table)


def write_json(
    path: Path,
    figures: list[Figure],
    facts: dict[str, Any],
    settings: dict[str, Any],
    extra: dict[str, Any],
) -> None:
    document = {
        "machine": facts,
        "settings": settings,
        "figures": [figure.as_dict() for figure in figures],
        **extra,
    }
    path.write_text(json.dumps(_without_nan(document), indent=1, allow_nan=False) + "\n")


def _without_nan(value: Any) -> Any:
    """NaN (a figure with no runs) as null: NaN is not JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: _without_nan(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_without_nan(item) for item in value]
    return value
