"""This run's RabbitMQ virtual host on the machine's node (127.0.0.1:5672, guest), made
and removed with ``rabbitmqctl``, and the operations tests perform on it from outside."""

from __future__ import annotations

import json
import subprocess

AMQP_SERVER = "amqp://guest:guest@127.0.0.1:5672"


class RabbitMQError(RuntimeError):
    """``rabbitmqctl`` failed; its output says why."""


def rabbitmqctl(*args: str, timeout: float = 30) -> str:
    try:
        done = subprocess.run(
            ["rabbitmqctl", "--quiet", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RabbitMQError(f"rabbitmqctl {' '.join(args)}: {e}") from e
    if done.returncode != 0:
        raise RabbitMQError(f"rabbitmqctl {' '.join(args)}: {done.stderr or done.stdout}")
    return done.stdout


def create_vhost(name: str) -> str:
    """Create ``name`` with full rights for guest; return its broker URL."""
    rabbitmqctl("add_vhost", name)
    rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
    return f"{AMQP_SERVER}/{name}"


def delete_vhost(name: str) -> None:
    rabbitmqctl("delete_vhost", name)


def connections(vhost: str) -> list[dict[str, str]]:
    """The client connections open on ``vhost``: their pid, and the client's port."""
    # The tab-separated listing, not JSON: only it writes pids as close_connection reads them.
    out = rabbitmqctl("list_connections", "--no-table-headers", "pid", "vhost", "peer_port")
    rows = [
        dict(zip(("pid", "vhost", "peer_port"), line.split("\t"), strict=True))
        for line in out.splitlines()
        if line.strip()
    ]
    return [c for c in rows if c["vhost"] == vhost]


def close_connection(pid: str, why: str) -> None:
    """Have the broker close a client's connection (``pid`` from :func:`connections`)."""
    rabbitmqctl("close_connection", pid, why)


def delete_queue(vhost: str, queue: str) -> None:
    rabbitmqctl("delete_queue", "-p", vhost, queue)


def set_queue_policy(vhost: str, name: str, pattern: str, definition: dict[str, object]) -> None:
    rabbitmqctl(
        "set_policy", "-p", vhost, "--apply-to", "queues", name, pattern, json.dumps(definition)
    )


def clear_policy(vhost: str, name: str) -> None:
    rabbitmqctl("clear_policy", "-p", vhost, name)
