"""A test-owned RabbitMQ node on free ports, killed or stopped and restarted by the test.

The machine's node is never touched: this one has its own name, ports, data directory,
configuration (no plugins) and Erlang cookie (its own ``HOME``), and runs in the
foreground as a child process group, so a SIGKILL takes the whole Erlang VM down as a
crash would. Its data directory survives restarts: durable queues and the persistent
messages the broker confirmed are still there afterwards.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from kombu import Connection

from tests.chaos.processes import Process
from tests.chaos.redis_server import free_port
from tests.services import wait_for

RABBITMQ_SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"
#: An Erlang VM takes seconds to boot, more on a busy machine.
BOOT_SECONDS = 90.0


class RabbitMQNode:
    """One node process at a time, always on the same ports and data directory."""

    def __init__(self, base: Path) -> None:
        self.name = f"outbox-{uuid.uuid4().hex[:8]}@localhost"
        self.port = free_port()
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}//"
        self.base = base
        self.process: Process | None = None
        self.starts = 0
        (base / "rabbitmq.conf").write_text(f"listeners.tcp.default = {self.port}\n")
        (base / "enabled_plugins").write_text("[].\n")
        (base / "rabbitmq-env.conf").write_text("")
        self.env = {
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(free_port()),
            "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(base / "log"),
            "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
            "RABBITMQ_CONF_ENV_FILE": str(base / "rabbitmq-env.conf"),
            "HOME": str(base),
        }

    def start(self) -> None:
        self.starts += 1
        process = self.process = Process(
            f"rabbitmq-{self.starts}", [RABBITMQ_SERVER], self.env, self.base
        )
        wait_for(lambda: not process.alive or self.answers(), timeout=BOOT_SECONDS, interval=0.2)
        assert process.alive, process.log()

    def kill(self) -> None:
        """SIGKILL the Erlang VM: what the broker has not written to disk is gone."""
        if self.process is not None:
            self.process.kill()

    def stop(self) -> None:
        """SIGTERM: the node closes its connections and shuts down cleanly."""
        if self.process is not None:
            self.process.stop(timeout=60)

    def answers(self) -> bool:
        try:
            with Connection(self.url, connect_timeout=1) as conn:
                conn.connect()
                return bool(conn.connected)
        except Exception:  # refused, or TCP accepted before AMQP is ready
            return False


@contextmanager
def rabbitmq_node(tmp_path: Path) -> Iterator[RabbitMQNode]:
    """A started node, killed at the end however the test ends."""
    base = tmp_path / "rabbitmq-node"
    base.mkdir()
    node = RabbitMQNode(base)
    try:
        node.start()
        yield node
    finally:
        node.kill()
