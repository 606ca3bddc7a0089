"""A test-owned redis-server on a free port, SIGKILLed and restarted by the test.

The machine's Redis is never touched. ``persistent=True`` keeps an append-only file
synced on every write (what Redis acknowledged survives a kill, and the file is the
broker's history); ``persistent=False`` keeps nothing, as a development Redis or a
managed one failing over to an empty replica: a restart loses every message. Such a
server can also be given an older copy of its data (an RDB file the test saved earlier)
to restart from, as a restore from a backup or a promoted lagging replica would.
"""

from __future__ import annotations

import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import redis

from tests.chaos.processes import Process
from tests.services import wait_for


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisServer:
    """One redis-server process at a time, always on the same port and directory."""

    def __init__(self, data_dir: Path, log_dir: Path, *, persistent: bool) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.data_dir = data_dir
        self.log_dir = log_dir
        self.persistent = persistent
        self.client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2)
        self.process: Process | None = None
        self.starts = 0

    def start(self) -> None:
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        if self.persistent:
            args += ["--appendonly", "yes", "--appendfsync", "always"]
            # No AOF rewrite: the incremental file keeps every command, for the history.
            args += ["--auto-aof-rewrite-percentage", "0"]
        else:
            args += ["--appendonly", "no"]
        args += ["--dir", str(self.data_dir), "--daemonize", "no"]
        self.starts += 1
        process = self.process = Process(f"redis-{self.starts}", args, {}, self.log_dir)
        wait_for(lambda: not process.alive or self.answers(), timeout=10)
        assert process.alive, process.log()

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()

    def snapshot(self, name: str) -> Path:
        """Save the data set as it is now (``SAVE``) and keep a copy of the file aside."""
        self.client.save()
        copy = self.log_dir / f"{name}.rdb"
        shutil.copyfile(self.data_dir / "dump.rdb", copy)
        return copy

    def restart_from(self, snapshot: Path) -> None:
        """Kill the server and start it on ``snapshot``'s data: whatever was written after
        the copy was taken is gone, the keys it held (the relays' marker) are not."""
        assert not self.persistent, "an append-only file would be loaded instead"
        self.kill()
        shutil.copyfile(snapshot, self.data_dir / "dump.rdb")
        self.start()

    def answers(self) -> bool:
        try:
            return bool(self.client.ping())
        except redis.RedisError:
            return False


@contextmanager
def redis_server(tmp_path: Path, *, persistent: bool) -> Iterator[RedisServer]:
    """A started server, killed at the end however the test ends."""
    data_dir = tmp_path / "redis-data"
    data_dir.mkdir()
    server = RedisServer(data_dir, tmp_path, persistent=persistent)
    try:
        server.start()
        yield server
    finally:
        server.kill()
        server.client.close()
