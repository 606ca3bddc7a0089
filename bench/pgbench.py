"""Concurrent writers on the run's database: ``pgbench`` committing one INSERT of a
pending outbox row per transaction, what an enqueue of ``notify_customer`` writes.

One Python process cannot offer thousands of commits a second from many connections on
this machine, so the sections that need many writers run pgbench, from PostgreSQL's
client tools, in the run's work directory, with ``THREADS`` threads whatever the number
of clients.
"""

from __future__ import annotations

import os
import shutil
import subprocess

from sqlalchemy import make_url

from bench.context import Context

#: pgbench threads, whatever the number of clients.
THREADS = 2

_INSERT = (
    "INSERT INTO celery_outbox (task_id, task_name, args, kwargs, options, status, attempts, "
    "deliveries, created_at, available_at, task_runs) VALUES (gen_random_uuid(), "
    "'orders.notify_customer', {args}, '{{}}', '{{}}', 'pending', 0, 0, now(), now(), 0);\n"
)


class Pgbench:
    """pgbench for ``section``, its rows' arguments the SQL expression ``args`` (pgbench's
    ``:client_id`` names the client)."""

    def __init__(self, ctx: Context, section: str, args: str) -> None:
        found = shutil.which("pgbench")
        if found is None:
            raise RuntimeError(
                f"the {section} section needs pgbench, from PostgreSQL's client tools "
                "(e.g. the postgresql-client package)"
            )
        self.binary = found
        self.ctx = ctx
        self.script = ctx.services.work_dir / f"{section}-insert.sql"
        self.script.write_text(_INSERT.format(args=args))

    def run(
        self, writers: int, options: list[str], timeout: float
    ) -> subprocess.CompletedProcess[str]:
        """One run from ``writers`` clients with ``options`` (how long, how fast); fails
        unless it succeeds. The password, if the URL has one, is in the environment
        rather than on the command line."""
        url = make_url(self.ctx.services.database_url)
        args = [self.binary, "-n", "-f", str(self.script), "-c", str(writers)]
        args += ["-j", str(THREADS), *options]
        if url.host:
            args += ["-h", url.host]
        if url.port:
            args += ["-p", str(url.port)]
        if url.username:
            args += ["-U", url.username]
        assert url.database
        args.append(url.database)
        env = dict(os.environ)
        if url.password:
            env["PGPASSWORD"] = str(url.password)
        done = subprocess.run(
            args,
            capture_output=True,
            text=True,
            env=env,
            cwd=self.ctx.services.work_dir,
            timeout=timeout,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"pgbench ({writers} clients) exited with {done.returncode}:\n"
                f"{done.stderr[-4000:]}{done.stdout[-2000:]}"
            )
        return done
