"""The long-running relay on PostgreSQL: woken by NOTIFY on commit, stopped by SIGTERM."""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from celery import Celery
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from outbox import OutboxStatus, Relay, TaskOutbox
from outbox.data import store_for
from outbox.relays.loop import RelayLoop
from tests.integration.test_delivery import broker_messages, row_status
from tests.services import ROOT, wait_for


@pytest.fixture
def loop(engine: Engine, celery_app: Celery) -> Iterator[RelayLoop]:
    # A poll interval far longer than the test: only a notification can wake it in time.
    loop = RelayLoop(Relay(engine, celery_app), poll_interval=600)
    thread = threading.Thread(target=loop.run, daemon=True)
    thread.start()
    yield loop
    loop.stop()
    thread.join(timeout=5)
    assert not thread.is_alive(), "stop() ends the loop within a second"


@pytest.mark.postgresql
def test_a_commit_wakes_the_relay_through_notify(
    loop: RelayLoop, engine: Engine, celery_app: Celery, redis_client: redis.Redis
) -> None:
    """A loop waiting on LISTEN is woken by the commit's notification, not by its poll."""
    wait_for(loop.waiting.is_set)  # drained what there was, now listening
    queue_name = "notify-test"
    with Session(engine) as session:
        result = TaskOutbox(celery_app).apply_async(
            "orders.notify_customer", args=(1,), queue=queue_name, session=session
        )
        session.commit()
    try:
        wait_for(lambda: row_status(engine, result.id) == OutboxStatus.DISPATCHED)
        assert [result.id] == [
            m["headers"]["id"] for m in broker_messages(redis_client, queue_name)
        ]
        assert (1, 0) == (loop.wakeups["notified"], loop.wakeups["timeout"])
    finally:
        redis_client.delete(queue_name)


def enqueue_and_see_it_dispatched(
    engine: Engine, celery_app: Celery, relay: subprocess.Popen[str], queue: str
) -> None:
    """Commit one task and wait until the running ``relay`` process has published it."""
    with Session(engine) as session:
        result = TaskOutbox(celery_app).apply_async(
            "orders.notify_customer", args=(1,), queue=queue, session=session
        )
        session.commit()
    dispatched = wait_for(
        lambda: row_status(engine, result.id) == OutboxStatus.DISPATCHED or relay.poll(),
    )
    assert dispatched is True, f"the relay exited ({relay.poll()})"


class Output:
    """A process's output lines, collected by a thread so they can be waited for."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self._queue: queue.Queue[str] = queue.Queue()
        self._thread = threading.Thread(target=self._read, args=(process,), daemon=True)
        self._thread.start()

    def _read(self, process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            self._queue.put(line)

    def wait_for_line(self, prefix: str) -> str:
        def seen() -> str | None:
            while not self._queue.empty():
                self.lines.append(self._queue.get())
            return next((line for line in self.lines if line.startswith(prefix)), None)

        found: str = wait_for(seen, timeout=60)
        return found

    def rest(self, process: subprocess.Popen[str]) -> str:
        self._thread.join(timeout=10)
        if process.stdout is not None:
            process.stdout.close()
        while not self._queue.empty():
            self.lines.append(self._queue.get())
        return "".join(self.lines)


def test_relay_command_runs_until_sigterm(
    engine: Engine, celery_app: Celery, tmp_path: Path
) -> None:
    """`flask outbox relay` says when it listens, publishes what commits, beats its
    heartbeat, serves metrics and exits on SIGTERM."""
    heartbeat = tmp_path / "relay.heartbeat"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        metrics_port = sock.getsockname()[1]
    command = [sys.executable, "-m", "flask", "--app", "webapp", "outbox", "relay"]
    process = subprocess.Popen(
        [
            *command,
            "--poll-interval",
            "600",
            "--heartbeat",
            str(heartbeat),
            "--metrics-port",
            str(metrics_port),
        ],
        cwd=ROOT,
        env=os.environ.copy(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output = Output(process)
    try:
        ready = output.wait_for_line("relay: ready, waiting for commits")
        store = store_for(engine)
        if store.notify_channel is not None:
            assert "(LISTEN celery_outbox, polling every 600s as well)" in ready
        else:
            interval = f"{(store.due_check_interval or 0) * 1000:g} ms"
            assert f"(checking for due rows every {interval}, polling every 600s as well)" in ready
        beaten_before = heartbeat.stat().st_mtime_ns
        enqueue_and_see_it_dispatched(engine, celery_app, process, "relay-cli-test")
        wait_for(lambda: heartbeat.stat().st_mtime_ns > beaten_before)
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            metrics = response.read().decode()
        assert 'celery_outbox_published_total{task="orders.notify_customer"} 1.0' in metrics
        assert "celery_outbox_pending 0.0" in metrics
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    text = output.rest(process)
    assert 0 == process.returncode, text
    assert "SIGTERM received" in text
    assert "relay: stopped" in text
