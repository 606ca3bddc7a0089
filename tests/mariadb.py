"""This run's MariaDB database and user on the machine's server (127.0.0.1:3306), made
and removed through the ``mariadb`` client as root (socket authentication), with the
statements on its standard input so that no password is on a command line."""

from __future__ import annotations

import contextlib
import secrets
import subprocess

MARIADB_SERVER = "127.0.0.1:3306"


class MariaDBError(RuntimeError):
    """The ``mariadb`` client failed; its output says why."""


def run_as_root(sql: str, *, timeout: float = 30, force: bool = False) -> str:
    """Run ``sql``; with ``force``, go on past statements that fail."""
    try:
        done = subprocess.run(
            ["mariadb", "-uroot", "--batch", "--skip-column-names", *(["--force"] * force)],
            input=sql,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise MariaDBError(f"mariadb -uroot: {e}") from e
    if done.returncode != 0:
        raise MariaDBError(f"mariadb -uroot: {done.stderr or done.stdout}")
    return done.stdout


def create_database(name: str) -> str:
    """Create database ``name`` and a user of the same name with every right on it (and
    none elsewhere, but to see the server's transactions); return its SQLAlchemy URL."""
    password = secrets.token_hex(16)
    run_as_root(
        f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci;\n"
        f"CREATE USER '{name}'@'127.0.0.1' IDENTIFIED BY '{password}';\n"
        f"GRANT ALL ON `{name}`.* TO '{name}'@'127.0.0.1';\n"
        # To see its own transactions' lock waits (information_schema.innodb_trx).
        f"GRANT PROCESS ON *.* TO '{name}'@'127.0.0.1';\n"
    )
    return f"mysql+pymysql://{name}:{password}@{MARIADB_SERVER}/{name}?charset=utf8mb4"


def drop_database(name: str) -> None:
    """Drop ``name`` and its user, closing the user's connections left open first."""
    ids = run_as_root(
        "SELECT id FROM information_schema.processlist "
        f"WHERE user = '{name}' AND id <> CONNECTION_ID();\n"
    ).split()
    if ids:
        # A connection may end meanwhile: its KILL fails, the others still run.
        with contextlib.suppress(MariaDBError):
            run_as_root("".join(f"KILL CONNECTION {int(i)};\n" for i in ids), force=True)
    run_as_root(f"DROP DATABASE IF EXISTS `{name}`;\nDROP USER IF EXISTS '{name}'@'127.0.0.1';\n")
