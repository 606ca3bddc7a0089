"""The long-running relay on PostgreSQL: woken by NOTIFY on commit, stopped by SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from celery import Celery
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from outbox import OutboxStatus, Relay, TaskOutbox
from outbox.relay_loop import RelayLoop
from tests.integration.test_delivery import broker_messages, row_status
from tests.services import ROOT, wait_for


@pytest.fixture
def loop(engine: Engine, celery_app: Celery) -> Iterator[RelayLoop]:
    # A poll interval far longer than the test: only a notification can wake it in time.
    loop = RelayLoop(Relay(engine, celery_app), poll_interval=60)
    thread = threading.Thread(target=loop.run, daemon=True)
    thread.start()
    yield loop
    loop.stop()
    thread.join(timeout=5)
    assert not thread.is_alive(), "stop() ends the loop within a second"


def test_a_commit_wakes_the_relay_at_once(
    loop: RelayLoop, engine: Engine, celery_app: Celery, redis_client: redis.Redis
) -> None:
    """The relay publishes a committed task long before its 60 s poll interval."""
    time.sleep(0.2)  # let the loop's first drain and LISTEN happen
    queue = "notify-test"
    with Session(engine) as session:
        result = TaskOutbox(celery_app).apply_async(
            "orders.notify_customer", args=(1,), queue=queue, session=session
        )
        session.commit()
    try:
        wait_for(lambda: row_status(engine, result.id) == OutboxStatus.DISPATCHED, timeout=5)
        assert [result.id] == [m["headers"]["id"] for m in broker_messages(redis_client, queue)]
    finally:
        redis_client.delete(queue)


def test_relay_command_runs_until_sigterm(
    engine: Engine, celery_app: Celery, tmp_path: Path
) -> None:
    """`flask outbox relay` publishes what commits, beats its heartbeat, exits on SIGTERM."""
    heartbeat = tmp_path / "relay.heartbeat"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        metrics_port = sock.getsockname()[1]
    command = [
        sys.executable,
        "-m",
        "flask",
        "--app",
        "webapp",
        "outbox",
        "relay",
        "--poll-interval",
        "60",
    ]
    process = subprocess.Popen(
        [*command, "--heartbeat", str(heartbeat), "--metrics-port", str(metrics_port)],
        cwd=ROOT,
        env=os.environ.copy(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        time.sleep(1.5)  # start-up: imports, first drain, LISTEN
        with Session(engine) as session:
            result = TaskOutbox(celery_app).apply_async(
                "orders.notify_customer", args=(1,), queue="relay-cli-test", session=session
            )
            session.commit()
        dispatched = wait_for(
            lambda: row_status(engine, result.id) == OutboxStatus.DISPATCHED or process.poll(),
            timeout=10,
        )
        assert dispatched is True, f"the relay exited ({process.poll()})"
        assert time.time() - heartbeat.stat().st_mtime < 10
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            metrics = response.read().decode()
        assert 'celery_outbox_published_total{task="orders.notify_customer"} 1.0' in metrics
        assert "celery_outbox_pending 0.0" in metrics
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert 0 == process.returncode, output
    assert "LISTEN/NOTIFY" in output
    assert "SIGTERM received" in output
    assert "relay: stopped" in output
