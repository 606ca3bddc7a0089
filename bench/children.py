"""Child processes the benchmark starts (relays, workers, watchers, a redis-server), each
in its own process group, and the one way each kind is started and waited for.

A child runs in a session of its own, so Ctrl-C in the terminal reaches only the
benchmark, which then stops its children itself; and stopping a child signals its group
(a worker's pool with it) by the child's PID, never anything the benchmark did not start.
Every child is recorded so :func:`stop_all` can end the ones still running, however the
benchmark exits.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from celery import Celery
from sqlalchemy import Engine

from bench.data import waiting_listeners

#: The checkout: children run from it so ``celeryconfig`` and ``bench`` import.
ROOT = Path(__file__).resolve().parents[1]
#: How long a child may take to start before the benchmark gives up on it.
START_TIMEOUT = 60.0

_running: list[Child] = []


def monotonic() -> float:
    """CLOCK_MONOTONIC: one clock for every process on the machine, so a child's start and
    end can be compared with the parent's and with another child's."""
    return time.clock_gettime(time.CLOCK_MONOTONIC)


class ChildError(Exception):
    """A child process failed or did not answer in time (the message holds its log)."""


class Child:
    """One child process group; its stderr (and stdout unless it talks to us) in a log file.

    With ``talk=True`` the child's stdin and stdout are pipes for the line protocol of
    :mod:`bench.child` ("ready", "go", one JSON result line). ``env`` is set over the
    benchmark's own environment (another broker's ``CELERY_BROKER_URL``, say). Children
    of one name share a log file, each appending; :meth:`log` shows this one's part.
    """

    def __init__(
        self,
        name: str,
        args: list[str],
        log_dir: Path,
        *,
        talk: bool = False,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._buffer = b""
        with self.log_path.open("ab") as log:
            self._log_start = log.tell()
            self.popen = subprocess.Popen(
                args,
                cwd=ROOT,
                env={**os.environ, **(env or {})},
                stdin=subprocess.PIPE if talk else subprocess.DEVNULL,
                stdout=subprocess.PIPE if talk else log,
                stderr=log,
                start_new_session=True,
            )
        _running.append(self)

    @classmethod
    def bench(
        cls, name: str, log_dir: Path, *args: str, env: Mapping[str, str] | None = None
    ) -> Child:
        """``python -m bench.child ARGS``, talking the line protocol."""
        return cls(name, [sys.executable, "-m", "bench.child", *args], log_dir, talk=True, env=env)

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def log(self, tail: int = 4000) -> str:
        """The end of what this child wrote to its log."""
        try:
            with self.log_path.open("rb") as log:
                log.seek(self._log_start)
                return log.read().decode(errors="replace")[-tail:]
        except FileNotFoundError:
            return ""

    def send(self, line: str) -> None:
        assert self.popen.stdin is not None
        self.popen.stdin.write(line.encode() + b"\n")
        self.popen.stdin.flush()

    def read_line(self, timeout: float) -> str:
        """The next line the child prints; fails if it exits or stays silent too long."""
        assert self.popen.stdout is not None
        fd = self.popen.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ChildError(f"{self.name} said nothing for {timeout:g}s:\n{self.log()}")
            readable, _, _ = select.select([fd], [], [], remaining)
            if not readable:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                self.popen.wait(timeout=10)
                raise ChildError(f"{self.name} exited with {self.popen.returncode}:\n{self.log()}")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode()

    def expect(self, word: str, timeout: float = START_TIMEOUT) -> None:
        line = self.read_line(timeout)
        if line != word:
            raise ChildError(f"{self.name} said {line!r}, expected {word!r}:\n{self.log()}")

    def result(self, timeout: float) -> dict[str, Any]:
        """The child's JSON result line."""
        value: dict[str, Any] = json.loads(self.read_line(timeout))
        return value

    def stop(self, timeout: float = 10) -> None:
        """SIGTERM the group, SIGKILL it if it has not exited within ``timeout``.

        The group is only signalled while its leader has not been reaped: until then its
        PID (and so the group id) cannot belong to anyone else.
        """
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                if self.popen.poll() is None:
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(timeout=10)
        self._forget()

    def kill(self) -> None:
        """SIGKILL the group at once: no shutdown handler runs, as in a crash (signalled
        only while the leader has not been reaped, as in :meth:`stop`)."""
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait(timeout=10)
        self._forget()

    def _forget(self) -> None:
        """Close the pipes and drop the child from the ones :func:`stop_all` stops."""
        for pipe in (self.popen.stdin, self.popen.stdout):
            if pipe is not None:
                pipe.close()
        if self in _running:
            _running.remove(self)

    def wait(self, timeout: float) -> int:
        """Wait for a child that finishes by itself; stop it if it overruns."""
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise ChildError(
                f"{self.name} did not exit within {timeout:g}s:\n{self.log()}"
            ) from None
        finally:
            if self.popen.poll() is not None:
                self.stop()


def stop_all() -> None:
    """Stop every child still running, newest first."""
    for child in reversed(list(_running)):
        child.stop()


def wait_for(
    done: Callable[[], bool],
    timeout: float,
    what: str,
    child: Child | None = None,
    *,
    interval: float = 0.05,
) -> None:
    """Check ``done`` every ``interval`` seconds until it holds; fail if ``child`` exits
    first, or after ``timeout`` seconds (``what`` says what was awaited)."""
    deadline = time.monotonic() + timeout
    while not done():
        if child is not None and not child.alive:
            raise ChildError(
                f"{child.name} exited with {child.popen.returncode} before {what}:\n{child.log()}"
            )
        if time.monotonic() > deadline:
            log = f":\n{child.log()}" if child is not None else ""
            raise ChildError(f"not {what} within {timeout:g}s{log}")
        time.sleep(interval)


@contextmanager
def started(child: Child) -> Iterator[Child]:
    """``child``, stopped when the block ends however it ends."""
    try:
        yield child
    finally:
        child.stop()


def example_relay(
    name: str,
    log_dir: Path,
    *options: str,
    env: Mapping[str, str] | None = None,
    waiting_in: Engine | None = None,
) -> Child:
    """The example's relay process, ``flask --app webapp outbox relay OPTIONS``, once it
    is ready: it has drained what was committed before it and waits for commits.

    With ``waiting_in`` (its PostgreSQL database) that is once its row in
    ``celery_outbox_listeners`` says it waits on LISTEN: from then on every commit
    notifies it. Elsewhere (MariaDB, a CDC relay) it is once it printed that it is ready
    and, with ``--cdc``, that it streams from its slot.
    """
    command = [sys.executable, "-m", "flask", "--app", "webapp", "outbox", "relay", *options]
    relay = Child(name, command, log_dir, env=env)
    words = ["relay: ready", *(["relay: streaming from slot"] if "--cdc" in options else [])]
    listener = f"{socket.gethostname()}:{relay.popen.pid}"

    def ready() -> bool:
        if waiting_in is not None:
            return waiting_listeners(waiting_in, listener) > 0
        return all(word in relay.log() for word in words)

    try:
        wait_for(ready, START_TIMEOUT, f"{name} ready", relay)
    except BaseException:
        relay.stop()
        raise
    return relay


def celery_workers(
    log_dir: Path, celery_app: Celery, workers: Sequence[tuple[str, str, str]]
) -> list[Child]:
    """``-P solo`` workers of :mod:`bench.celery_app`, one per ``(name, node, queues)``,
    started together and handed back once each answers a ping as its node. A solo worker
    is one OS process running tasks in its main loop, which on two cores is the sensible
    unit (a prefork worker with ``-c 1`` adds a pool process and a pipe hop per task; more
    processes than cores only add switching)."""

    def answers(node: str) -> Callable[[], bool]:
        # The ping waits up to half a second for an answer itself.
        return lambda: bool(celery_app.control.ping(destination=[node], timeout=0.5))

    children: list[Child] = []
    try:
        for name, node, queues in workers:
            command = [
                sys.executable, "-m", "celery", "-A", "bench.celery_app", "worker",
                "--pool", "solo", "--queues", queues, "--hostname", node,
                "--loglevel", "WARNING", "--without-gossip", "--without-mingle",
                "--without-heartbeat",
            ]  # fmt: skip
            children.append(Child(name, command, log_dir))
        for worker, (name, node, _) in zip(children, workers, strict=True):
            wait_for(answers(node), START_TIMEOUT, f"{name} answering a ping", worker, interval=0)
    except BaseException:
        for worker in children:
            worker.stop()
        raise
    return children


class Watcher:
    """The ``watch`` child (:mod:`bench.child`): once told to go, it pops messages off
    the broker's queue as they land and says when each task id arrived."""

    def __init__(self, child: Child, seconds: float) -> None:
        self.child = child
        self.seconds = seconds

    def go(self) -> None:
        self.child.send("go")

    def arrivals(self) -> dict[str, float]:
        """Each task id's arrival, once ``count`` arrived or ``seconds`` passed."""
        found: dict[str, float] = self.child.result(self.seconds + 10)["arrivals"]
        self.child.wait(10)
        return found


@contextmanager
def watching(
    log_dir: Path, count: int, seconds: float, *, wall_clock: bool = False
) -> Iterator[Watcher]:
    """A watcher of ``count`` messages for at most ``seconds``, ready (imported and
    connected) when the block starts and stopped when it ends; ``wall_clock`` notes
    arrivals in Unix time, as pgbench logs its commits, instead of :func:`monotonic`."""
    args = ["watch", "--count", str(count), "--seconds", str(seconds)]
    child = Child.bench("watch", log_dir, *args, *(["--wall-clock"] if wall_clock else []))
    with started(child):
        child.expect("ready")
        yield Watcher(child, seconds)
