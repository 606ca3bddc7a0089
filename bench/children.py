"""Child processes the benchmark starts (relays, workers, a redis-server), each in its own
process group.

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
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

#: The checkout: children run from it so ``celeryconfig`` and ``bench`` import.
ROOT = Path(__file__).resolve().parents[1]

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
    benchmark's own environment (another broker's ``CELERY_BROKER_URL``, say).
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
        try:
            return self.log_path.read_text(errors="replace")[-tail:]
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

    def expect(self, word: str, timeout: float = 60) -> None:
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
