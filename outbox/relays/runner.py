"""A relay process: what ``flask outbox relay`` (and ``python -m outbox relay``) runs.

The relay loop, and beside it, when asked, the change-data-capture stream in a thread of
its own, a Prometheus metrics server and a liveness file touched after every drain; its
logging set up if the host application has not; stopped by SIGTERM or SIGINT after the
batch in hand. The command line only turns its options into a :class:`RelayProcess`.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from celery.result import _set_task_join_will_block  # type: ignore[attr-defined]
from prometheus_client import start_http_server

from outbox.errors import OutboxError
from outbox.observability.metrics import register_outbox_collector
from outbox.relays.batch import DrainResult, Relay
from outbox.relays.cdc import CdcRelay
from outbox.relays.loop import DEFAULT_POLL_INTERVAL, RelayLoop

logger = logging.getLogger(__name__)

#: How long a relay with a CDC stream waits for the stream to start before polling anyway.
CDC_START_TIMEOUT = 30.0


def _log(line: str) -> None:
    logger.info("%s", line)


@dataclass
class RelayProcess:
    """One relay process: ``run()`` blocks until SIGTERM or SIGINT.

    ``say`` and ``complain`` print its progress lines ("relay: ready, …"), which
    operators and supervisors read; the command line gives ``click.echo``.
    """

    relay: Relay
    poll_interval: float = DEFAULT_POLL_INTERVAL
    #: The CDC stream to run beside the loop (``relay --cdc``), not yet started.
    stream: CdcRelay | None = None
    #: Where the stream's slot is dropped from, named when it is invalidated.
    drop_slot_command: str = "python -m outbox cdc drop-slot"
    metrics_port: int | None = None
    #: A file touched after every drain, for liveness probes.
    heartbeat_file: Path | None = None
    say: Callable[[str], None] = _log
    complain: Callable[[str], None] = _log
    _stream_thread: threading.Thread | None = field(default=None, repr=False)

    def run(self) -> None:
        """Run until stopped; raises :class:`OutboxError` when the stream cannot start."""
        if not logging.getLogger().handlers:
            # A process of its own: show what it does (a host app may configure it first).
            logging.basicConfig(
                level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
            )
        # Like a worker, this process never waits for task results: without this, Celery
        # subscribes it to every published task's result channel (Redis result backend)
        # and the subscriptions only ever grow.
        _set_task_join_will_block(True)
        if self.stream is not None:
            self._start_stream(self.stream)
        # Beside a stream, polling is only for what the stream leaves (delays, ordering
        # keys, retries): no commit needs to wake it.
        loop = RelayLoop(self.relay, poll_interval=self.poll_interval, listen=self.stream is None)
        if self.metrics_port is not None:
            register_outbox_collector(lambda: self.relay.engine, self.relay.now)
            start_http_server(self.metrics_port)
            self.say(f"relay: metrics on http://0.0.0.0:{self.metrics_port}/metrics")
        self._stop_on_signals(loop)
        self.say(
            "relay: publishing from "
            f"{self.relay.engine.url.render_as_string(hide_password=True)} "
            f"to {self.relay.probe.name}"
        )
        try:
            loop.run(
                on_drain=self._on_drain,
                on_ready=lambda how: self.say(f"relay: ready, waiting for commits ({how})"),
            )
        finally:
            if self.stream is not None and self._stream_thread is not None:
                self.stream.stop()
                self._stream_thread.join(timeout=30)
            self.relay.close()
        self.say("relay: stopped")

    def _on_drain(self, result: DrainResult) -> None:
        if self.heartbeat_file is not None:
            self.heartbeat_file.touch()
        if result.published or result.failed:
            logger.info(
                "relay: published %d, failed %d (dead %d)",
                result.published,
                result.failed,
                result.dead,
            )

    def _stop_on_signals(self, loop: RelayLoop) -> None:
        def stop(signum: int, _frame: object) -> None:
            # Work that takes locks or writes to stdout does not belong in a signal
            # handler: hand it to a thread.
            def stop_loop() -> None:
                self.say(
                    f"relay: {signal.Signals(signum).name} received, finishing the current batch"
                )
                loop.stop()
                if self.stream is not None:
                    self.stream.stop()

            threading.Thread(target=stop_loop, name="relay-stop").start()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)

    def _start_stream(self, stream: CdcRelay) -> None:
        """The CDC stream in a thread of its own, once its slot and publication exist."""
        try:
            import psycopg  # noqa: F401 - the stream's driver, checked before anything starts
        except ImportError as e:
            raise OutboxError(
                "the CDC relay streams with psycopg 3: pip install 'celery-outbox[cdc]'"
            ) from e
        if stream.slot.ensure():
            self.say(
                f"relay: created replication slot {stream.slot.slot} and publication "
                f"{stream.slot.publication}"
            )

        def run() -> None:
            stream.run(
                on_streaming=lambda: self.say(f"relay: streaming from slot {stream.slot.slot}"),
                ensured=True,
            )
            if stream.invalidated.is_set():
                self.complain(
                    f"relay: slot {stream.slot.slot} is invalidated; polling publishes "
                    f"everything. Run `{self.drop_slot_command}`, then start the relay again."
                )

        self._stream_thread = threading.Thread(target=run, name="outbox-cdc", daemon=True)
        self._stream_thread.start()
        # The polling loop starts once the stream streams (its heartbeat written, so
        # polling leaves it the rows it publishes) or stands by; otherwise both would
        # publish the first rows. A stream that cannot start is retried; polling goes on
        # meanwhile.
        if not stream.settled.wait(CDC_START_TIMEOUT):
            logger.warning("cdc: the stream has not started within %gs", CDC_START_TIMEOUT)
