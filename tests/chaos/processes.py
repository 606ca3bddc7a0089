"""Real relay and worker processes that chaos tests start, kill with SIGKILL and restart.

Each process runs in its own session (process group), so killing it takes its children
(a prefork worker's pool) with it, and only the processes a test started are touched.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from celery import Celery

from tests.services import ROOT, wait_for, worker_command

#: Chaos workers redeliver what a killed worker held after 2 s instead of kombu's hour,
#: and look for such messages every second. A worker killed while restoring keeps the
#: restore mutex until it expires (5 minutes by default), so that expires fast too.
FAST_REDELIVERY = {
    "visibility_timeout": 2,
    "unacked_restore_interval": 1,
    "unacked_restore_throttle": 1,
    "unacked_mutex_expire": 3,
}


#: What a Celery worker logs once it consumes.
READY = re.compile(r"\bready\.")


class Process:
    """One child process group with its output in a log file."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        with self.log_path.open("ab") as log:
            self.popen = subprocess.Popen(
                args,
                cwd=ROOT,
                env={**os.environ, **env},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL the whole group: no shutdown handler, no acknowledgement, no commit."""
        if self.alive:
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait(timeout=10)

    def stop(self, timeout: float = 20) -> int:
        """SIGTERM, then SIGKILL if it has not exited within ``timeout``."""
        if self.alive:
            os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.popen.returncode


def start_relay(name: str, log_dir: Path, **env: str) -> Process:
    command = ["flask", "--app", "webapp", "outbox", "relay", "--poll-interval", "0.2"]
    return Process(name, [sys.executable, "-m", *command], env, log_dir)


def start_worker(
    name: str,
    queue: str,
    log_dir: Path,
    celery_app: Celery,
    *,
    ready: bool = True,
    ready_in_log: bool = False,
    **env: str,
) -> Process:
    """A prefork worker on ``queue`` only, with fast redelivery.

    With ``ready`` it waits until the worker answers a ping through ``celery_app``'s
    broker, or with ``ready_in_log`` until it logs that it is ready (a worker on a broker
    of its own); without either it returns at once.
    """
    node = f"{name}@localhost"
    args = worker_command(node, queue)
    env = {"CELERY_BROKER_TRANSPORT_OPTIONS": json.dumps(FAST_REDELIVERY), **env}
    process = Process(name, args, env, log_dir)
    try:
        if ready_in_log:
            wait_for(lambda: not process.alive or READY.search(process.log()), timeout=60)
        elif ready:
            wait_for(
                lambda: (
                    not process.alive or celery_app.control.ping(destination=[node], timeout=0.5)
                ),
                timeout=60,
            )
        assert process.alive, process.log()
    except BaseException:
        process.kill()
        raise
    return process


def stop_all(processes: list[Process]) -> None:
    for process in processes:
        process.stop()


def pause(seconds: float) -> None:
    """A deliberate wait between faults (chaos needs time to pass, not a condition)."""
    time.sleep(seconds)
