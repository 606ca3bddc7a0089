"""A PostgreSQL cluster of the run's own with ``wal_level = logical``, for the
change-data-capture relay.

The machine's server runs with ``wal_level = replica``, and changing that needs a restart
of a server other runs share. So the tests that read the write-ahead log start a cluster
of their own with ``initdb`` on a free port, in a temporary directory, and remove it
afterwards. As root, the server runs as the ``postgres`` user (PostgreSQL refuses root).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import select
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from outbox.postgres.pgoutput import Commit, Message, decode

#: How long the server may take to start or stop (``pg_ctl -t``).
START_TIMEOUT = 60


class ClusterError(RuntimeError):
    """The cluster could not be made or started; its log says why."""


@dataclass(frozen=True)
class LogicalCluster:
    """A running cluster: where it listens and lives."""

    port: int
    data_dir: Path
    bin_dir: Path

    @property
    def server_url(self) -> str:
        """A SQLAlchemy URL for the server, without a database."""
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}"

    def url(self, database: str) -> str:
        return f"{self.server_url}/{database}"

    def dsn(self, database: str) -> str:
        """A libpq connection string for ``database``."""
        return f"host=127.0.0.1 port={self.port} user=postgres dbname={database}"

    def log(self) -> str:
        path = self.data_dir / "server.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def pg_ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return _run([str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), *args], check)

    def restart(self) -> None:
        self.pg_ctl("restart", "-w", "-t", str(START_TIMEOUT), "-m", "fast")


def bin_dir() -> Path:
    """The newest installed PostgreSQL's server programs (Debian keeps them off the PATH)."""
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name)
    )
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    if initdb is None:
        raise ClusterError("initdb not found: install PostgreSQL's server package")
    return Path(initdb).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _as_postgres() -> list[str]:
    """Run as ``postgres`` when root (the server refuses to run as root)."""
    return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


def _run(args: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [*_as_postgres(), *args], capture_output=True, text=True, timeout=120, check=False
    )
    if check and done.returncode != 0:
        raise ClusterError(f"{' '.join(args[:2])} failed: {done.stderr or done.stdout}")
    return done


@contextlib.contextmanager
def logical_cluster(
    *, durable: bool = False, settings: dict[str, str] | None = None
) -> Iterator[LogicalCluster]:
    """Start a cluster with ``wal_level = logical``; stop and remove it afterwards.

    ``durable=False`` (tests) turns ``fsync`` off: nothing here survives the run anyway.
    A benchmark asks for ``durable=True``, to measure what production pays. ``settings``
    adds server settings (e.g. ``shared_preload_libraries``).
    """
    programs = bin_dir()
    root = Path(tempfile.mkdtemp(prefix="outbox-logical-"))
    data = root / "data"
    if os.geteuid() == 0:
        entry = pwd.getpwnam("postgres")
        os.chown(root, entry.pw_uid, entry.pw_gid)
    cluster = LogicalCluster(free_port(), data, programs)
    try:
        _run(
            [
                str(programs / "initdb"),
                "-D",
                str(data),
                "-U",
                "postgres",
                "--auth=trust",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
            ]
        )
        settings = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(cluster.port),
            "unix_socket_directories": f"'{root}'",
            "wal_level": "logical",
            "max_wal_senders": "10",
            "max_replication_slots": "10",
            "fsync": "on" if durable else "off",
            "full_page_writes": "on" if durable else "off",
            "shared_buffers": "128MB",
            "log_min_messages": "warning",
            # A relay killed with SIGKILL leaves its walsender until the server notices.
            "wal_sender_timeout": "10s",
            **(settings or {}),
        }
        with (data / "postgresql.auto.conf").open("a") as conf:
            conf.writelines(f"{name} = {value}\n" for name, value in settings.items())
        with (data / "pg_hba.conf").open("a") as hba:
            hba.write("host replication all 127.0.0.1/32 trust\n")
        started = cluster.pg_ctl(
            "start", "-w", "-t", str(START_TIMEOUT), "-l", str(data / "server.log"), check=False
        )
        if started.returncode != 0:
            raise ClusterError(f"the logical cluster did not start:\n{cluster.log()[-4000:]}")
        yield cluster
    finally:
        if (data / "postmaster.pid").exists():
            cluster.pg_ctl("stop", "-w", "-t", str(START_TIMEOUT), "-m", "immediate", check=False)
        shutil.rmtree(root, ignore_errors=True)


def read_until_commit(cursor: Any, timeout: float) -> tuple[list[Message], int]:
    """The messages a started replication cursor (psycopg 2's) streams, decoded, up to
    and including the next Commit, and that Commit's end position."""
    messages: list[Message] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        raw = cursor.read_message()
        if raw is None:
            select.select([cursor.connection], [], [], 0.1)
            continue
        message = decode(raw.payload)
        messages.append(message)
        if isinstance(message, Commit):
            return messages, message.end_lsn
    raise TimeoutError(f"no Commit streamed within {timeout}s: {messages!r}")
