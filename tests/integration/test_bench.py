"""``python -m bench --quick`` runs every section end to end against the real services.

A smoke test of the benchmark's plumbing (its own database and Redis DB, child processes,
the table), not of its figures: tiny sizes, one run, no timing asserted.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from bench.cli import SECTIONS
from tests.conftest import PG_SERVER

ROOT = Path(__file__).resolve().parents[2]
#: Bounds a broken run; a healthy one takes about 35 s, more on a busy machine.
QUICK_TIMEOUT = 180
#: A figure each section prints (the start of its row's name).
SECTION_ROWS = {
    "request": "confirm via outbox",
    "enqueue": "enqueue part: whole",
    "relay": "one relay process",
    "bare": "ratio relay / plain, no task events",
    "amqp": "ratio relay / confirm_publish loop",
    "batch": "one relay, batch size",
    "latency": "relay process (LISTEN/NOTIFY): p50",
    "wakeup": "4 writers, writers only",
    "wakeup_mariadb": "MariaDB, 4 writers",
    "cdc": "CDC relay (--cdc): commit",
    "fanin": "1 relay at",
    "backlog": "claim 200 rows beside",
    "e2e": "commit → finished, 1 worker",
    "ordering": "claim 200 rows, keyed",
    "probes": "collect_stats beside",
    "restart": "notice and republish",
}


def test_quick_benchmark_prints_every_section_and_drops_its_database() -> None:
    """Exit 0, a row for each section in the table, and its database gone afterwards."""
    assert list(SECTIONS) == list(SECTION_ROWS), "SECTION_ROWS names one row per section"
    env = {
        key: value
        for key, value in os.environ.items()
        # The benchmark sets up its own database and broker; it must not need ours.
        if key not in {"DATABASE_URL", "CELERY_BROKER_URL", "CELERY_RESULT_BACKEND"}
    }
    env["COLUMNS"] = "250"
    process = subprocess.Popen(
        [sys.executable, "-m", "bench", "--quick"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=QUICK_TIMEOUT)
    except subprocess.TimeoutExpired:
        # SIGTERM, not SIGKILL: the benchmark then stops its children and drops its database.
        process.terminate()
        stdout, stderr = process.communicate(timeout=30)
        pytest.fail(f"python -m bench --quick took over {QUICK_TIMEOUT}s:\n{stdout}\n{stderr}")
    assert 0 == process.returncode, stdout + stderr
    for section, row in SECTION_ROWS.items():
        assert any(
            line.lstrip("│ ").startswith(section) and row in line for line in stdout.splitlines()
        ), f"no {section!r} row {row!r} in:\n{stdout}"
    admin = PG_SERVER.replace("postgresql+psycopg://", "postgresql://") + "/postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        left = conn.execute(
            "SELECT count(*) FROM pg_database WHERE datname = %s",
            (f"outbox_bench_{process.pid}",),
        ).fetchone()
    assert (0,) == left
