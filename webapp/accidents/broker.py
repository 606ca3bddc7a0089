"""The demo's embedded broker, with the two faults the accidents need.

It is the library's filesystem transport (``outbox.FilesystemTransport``, the example's
embedded default: messages are files in a folder, each written whole) with two
switches, thrown by the demo:

- **down**: the broker refuses connections and publishes, as a stopped broker does;
  consumers already connected see nothing arrive.
- **acknowledgements lost**: the first publish of each task is written to the broker,
  and then the publisher gets a time-out instead of the broker's answer, as when the
  network drops the reply. The message is on the broker; the publisher cannot know it.

Both raise errors of the kinds kombu lists as the transport's connection errors, so
Celery's publish retries and the outbox's relay react to them as they do to a real
broker's. Registered as the ``outbox-demo://`` transport.
"""

from __future__ import annotations

import socket
import threading
from typing import Any

from kombu.transport import TRANSPORT_ALIASES

from outbox import FilesystemChannel, FilesystemTransport


class Faults:
    """The switches, shared by every connection of the process, and what they did."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.down = False
        #: While set, the first publish of each task loses its acknowledgement.
        self.acks_lost = False
        self._lost_once: set[str] = set()
        #: Messages written to the broker (acknowledged or not) since the last reset.
        self.written = 0
        #: Messages written since the process started: what the worker's runs are
        #: counted against, since a reset does not take back what is in the queue.
        self.written_ever = 0

    def reset(self) -> None:
        with self._lock:
            self.down = self.acks_lost = False
            self._lost_once.clear()
            self.written = 0

    def after_write(self, payload: Any) -> None:
        task_id = str((payload.get("headers") or {}).get("id"))
        with self._lock:
            self.written += 1
            self.written_ever += 1
            lose = self.acks_lost and task_id not in self._lost_once
            if lose:
                self._lost_once.add(task_id)
        if lose:
            raise TimeoutError("timed out waiting for the broker's acknowledgement")


FAULTS = Faults()


class BrokerDownError(ConnectionRefusedError):
    """The demo's broker is down."""


class Channel(FilesystemChannel):
    def _put(self, queue: str, message: Any, **kwargs: Any) -> None:
        if FAULTS.down:
            raise BrokerDownError("the broker refused the connection (it is down)")
        super()._put(queue, message, **kwargs)
        FAULTS.after_write(message)


class Transport(FilesystemTransport):
    Channel = Channel
    driver_name = "outbox-demo"
    connection_errors = (
        *FilesystemTransport.connection_errors,
        ConnectionRefusedError,
        TimeoutError,
        socket.timeout,
    )
    recoverable_connection_errors = connection_errors

    def establish_connection(self) -> Any:
        if FAULTS.down:
            raise BrokerDownError("the broker refused the connection (it is down)")
        return super().establish_connection()


TRANSPORT_ALIASES["outbox-demo"] = f"{__name__}:Transport"
