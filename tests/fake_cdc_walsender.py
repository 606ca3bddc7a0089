"""A walsender of the test's own: it speaks PostgreSQL's streaming replication protocol to
one client, and sends what the test tells it to, when the test tells it to.

A real server decides by itself when a keepalive goes out and what it says; the
interleavings that matter to the CDC relay (a keepalive right after a Relation message,
a client silent for longer than ``wal_sender_timeout``) happen on it by chance. This one
makes them happen on cue, and records every status update the client sends, so a test
can assert on exactly what the client confirmed, and when.

The protocol, from "Frontend/Backend Protocol" and "Streaming Replication Protocol" in
PostgreSQL's manual: the startup exchange (no TLS, no password), a simple query for
``START_REPLICATION``, then CopyData both ways: ``w`` (XLogData) and ``k`` (keepalive)
down, ``r`` (standby status update) up. Like a real walsender, it asks for a reply
after half its ``timeout`` of silence, and ends the connection after the whole of it.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from outbox.postgres.pgoutput import PG_EPOCH, Message
from tests.unit.test_pgoutput import encode

_SSL_REQUEST = 80877103
_GSSENC_REQUEST = 80877104
_PROTOCOL_3 = 196608


@dataclass(frozen=True)
class Status:
    """One standby status update the client sent."""

    write: int
    flush: int
    apply: int
    reply_requested: bool
    #: How many keepalives had been sent when it arrived.
    after_keepalives: int


def _now_micros() -> int:
    return int((datetime.now(UTC) - PG_EPOCH).total_seconds() * 1_000_000)


def xlog_data(data_start: int, message: Message, wal_end: int | None = None) -> bytes:
    """An XLogData CopyData payload carrying one pgoutput message."""
    end = data_start if wal_end is None else wal_end
    return b"w" + struct.pack("!QQq", data_start, end, _now_micros()) + encode(message)


def keepalive(wal_end: int, *, reply: bool = False) -> bytes:
    return b"k" + struct.pack("!Qq?", wal_end, _now_micros(), reply)


class FakeWalsender:
    """Listens on a free port of 127.0.0.1 until :meth:`close`; one client at a time."""

    def __init__(self, timeout: float | None = None) -> None:
        self.timeout = timeout
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._client: socket.socket | None = None
        self._last_heard = time.monotonic()
        self._keepalives = 0
        #: The furthest WAL position sent, for the keepalives the watchdog sends itself.
        self._wal_end = 0
        self.statuses: list[Status] = []
        #: Set once a client asked to stream (``START_REPLICATION``).
        self.streaming = threading.Event()
        #: Set once a client stayed silent for longer than ``timeout``.
        self.timed_out = threading.Event()
        self.connections = 0
        #: Watchdog rounds (a quarter of ``timeout`` each) survived since :meth:`mark`.
        self._rounds = 0
        self._closing = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()
        if timeout is not None:
            threading.Thread(target=self._watch, daemon=True).start()

    @property
    def dsn(self) -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname=fake sslmode=disable"

    def send(self, *payloads: bytes) -> None:
        """CopyData messages, in one write: the client finds them all in its buffer."""
        frames = b"".join(b"d" + struct.pack("!i", len(p) + 4) + p for p in payloads)
        with self._lock:
            for p in payloads:
                self._keepalives += p[:1] == b"k"
                end = struct.unpack("!Q", p[9:17] if p[:1] == b"w" else p[1:9])[0]
                self._wal_end = max(self._wal_end, end)
            client = self._client
        assert client is not None, "no client streams"
        client.sendall(frames)

    @property
    def keepalives_sent(self) -> int:
        with self._lock:
            return self._keepalives

    def mark(self) -> None:
        """Start counting watchdog rounds from now."""
        with self._lock:
            self._rounds = 0

    def rounds_survived(self) -> int:
        with self._lock:
            return self._rounds

    def close(self) -> None:
        self._closing.set()
        self._listener.close()
        with self._lock:
            client = self._client
        if client is not None:
            client.close()

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _watch(self) -> None:
        assert self.timeout is not None
        asked = False
        while not self._closing.wait(self.timeout / 4):
            with self._lock:
                client, silent = self._client, time.monotonic() - self._last_heard
                if client is not None and self.streaming.is_set():
                    self._rounds += 1
            if client is None or not self.streaming.is_set():
                continue
            if silent > self.timeout:
                # What a real walsender does: "terminating walsender process due to
                # replication timeout".
                self.timed_out.set()
                client.close()
            elif silent > self.timeout / 2 and not asked:
                asked = True
                self.send(keepalive(self._wal_end, reply=True))
            elif silent <= self.timeout / 2:
                asked = False

    def _serve(self, client: socket.socket) -> None:
        try:
            self._startup(client)
            while True:
                kind, body = _read_message(client)
                with self._lock:
                    self._last_heard = time.monotonic()
                if kind == b"Q":
                    self._query(client, body.rstrip(b"\0").decode())
                elif kind == b"d" and body[:1] == b"r":
                    write, flush, apply, _, reply = struct.unpack("!QQQq?", body[1:])
                    with self._lock:
                        self.statuses.append(Status(write, flush, apply, reply, self._keepalives))
                elif kind in (b"X", b"c"):
                    return
        except (OSError, ConnectionError):
            return
        finally:
            with self._lock:
                if self._client is client:
                    self._client = None
            client.close()

    def _startup(self, client: socket.socket) -> None:
        while True:
            (length,) = struct.unpack("!i", _read_exactly(client, 4))
            body = _read_exactly(client, length - 4)
            (code,) = struct.unpack("!i", body[:4])
            if code in (_SSL_REQUEST, _GSSENC_REQUEST):
                client.sendall(b"N")
                continue
            assert code == _PROTOCOL_3, code
            break
        out = [_frame(b"R", struct.pack("!i", 0))]
        for name, value in (
            ("server_version", "15.0"),
            ("server_encoding", "UTF8"),
            ("client_encoding", "UTF8"),
            ("DateStyle", "ISO, MDY"),
            ("TimeZone", "UTC"),
            ("integer_datetimes", "on"),
            ("standard_conforming_strings", "on"),
        ):
            out.append(_frame(b"S", name.encode() + b"\0" + value.encode() + b"\0"))
        out.append(_frame(b"K", struct.pack("!ii", 4242, 1)))
        out.append(_frame(b"Z", b"I"))
        client.sendall(b"".join(out))
        with self._lock:
            self.connections += 1

    def _query(self, client: socket.socket, query: str) -> None:
        if not query.startswith("START_REPLICATION"):
            client.sendall(_frame(b"C", b"SET\0") + _frame(b"Z", b"I"))
            return
        with self._lock:
            self._client = client
            self._last_heard = time.monotonic()
        client.sendall(_frame(b"W", struct.pack("!bh", 0, 0)))
        self.streaming.set()


def _frame(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!i", len(body) + 4) + body


def _read_exactly(client: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = client.recv(n - len(data))
        if not chunk:
            raise ConnectionError("the client went away")
        data += chunk
    return data


def _read_message(client: socket.socket) -> tuple[bytes, bytes]:
    kind = _read_exactly(client, 1)
    (length,) = struct.unpack("!i", _read_exactly(client, 4))
    return kind, _read_exactly(client, length - 4)
