"""``python -m outbox``: the operational commands for an application without Flask, given
a Celery app (as ``celery -A`` names it) and the database URL from the environment."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

from celery import Celery
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from outbox import TaskOutbox
from tests.integration.test_relay_loop import Output, enqueue_and_see_it_dispatched
from tests.services import ROOT

COMMAND = [sys.executable, "-m", "outbox", "--app", "tasks"]


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*COMMAND, *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_status_reads_the_database_named_in_the_environment(
    engine: Engine, celery_app: Celery
) -> None:
    with Session(engine) as session:
        TaskOutbox(celery_app).apply_async("orders.notify_customer", args=(1,), session=session)
        session.commit()
    done = run("status", "--json")
    assert 0 == done.returncode, done.stderr
    stats = json.loads(done.stdout)
    assert (1, 1) == (stats["pending"], stats["due"])


def test_the_relay_publishes_until_sigterm(engine: Engine, celery_app: Celery) -> None:
    process = subprocess.Popen(
        [*COMMAND, "relay", "--poll-interval", "600"],
        cwd=ROOT,
        env=os.environ.copy(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output = Output(process)
    try:
        output.wait_for_line("relay: ready, waiting for commits")
        enqueue_and_see_it_dispatched(engine, celery_app, process, "standalone-cli-test")
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    text = output.rest(process)
    assert 0 == process.returncode, text
    assert "relay: stopped" in text


def test_an_app_that_cannot_be_loaded_is_named() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "outbox", "--app", "no_such_module", "status"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert 2 == done.returncode
    assert "cannot load a Celery app from 'no_such_module'" in done.stderr


def test_a_database_the_outbox_does_not_support_is_refused() -> None:
    done = run("status", env={"OUTBOX_DATABASE_URL": "mssql+pyodbc://sa@nowhere/orders"})
    assert 1 == done.returncode
    assert "does not support the 'mssql' database" in done.stderr
