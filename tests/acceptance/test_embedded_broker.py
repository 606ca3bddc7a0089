"""The embedded default's broker: a plain ``celery -A tasks worker`` on it survives
messages published while it consumes, and takes every one."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery import Celery

from tests.services import started_worker, wait_for, worker_command

#: Messages published, by this many threads at once: enough for kombu's own writer to
#: hand the worker an empty file in most runs, few enough to take seconds.
MESSAGES, PUBLISHERS = 400, 4
#: Bytes of padding per message: a longer write is a wider window to catch it half done.
PADDING = 50_000
#: The worker polls its folder this often (seconds), as a busy consumer does.
POLLING = '{"polling_interval": 0.001}'


@pytest.fixture
def embedded_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The environment of the README's embedded set-up, in a folder of the test's own:
    no database, broker or result backend named, so the example's defaults apply."""
    for name in ("DATABASE_URL", "CELERY_BROKER_URL", "CELERY_RESULT_BACKEND"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OUTBOX_DEMO_DIR", str(tmp_path / "var"))
    monkeypatch.setenv("CELERY_BROKER_TRANSPORT_OPTIONS", POLLING)
    return dict(os.environ)


@pytest.fixture
def worker_log(embedded_env: dict[str, str], tmp_path: Path) -> Iterator[Path]:
    """``celery -A tasks worker`` on the embedded default, ready (its log says so)."""
    log = tmp_path / "worker.log"
    command = worker_command("embedded@localhost", include="tests.acceptance.embedded_tasks")
    with started_worker(
        command, log, embedded_env, lambda: " ready." in log.read_text()
    ) as process:
        yield log
        assert process.poll() is None, f"the worker died:\n{log.read_text()[-3000:]}"


def publisher(embedded_env: dict[str, str]) -> Celery:
    """A Celery app on the example's default broker URL and transport options, as the
    web app's process builds them."""
    from webapp import config

    app = Celery("embedded-publisher", set_as_current=False)
    app.conf.update(
        broker_url=config.broker_url(),
        broker_transport_options=config.broker_transport_options(),
        task_serializer="json",
    )
    return app


def test_the_worker_survives_messages_published_while_it_consumes(
    embedded_env: dict[str, str], worker_log: Path
) -> None:
    """Four threads publish 400 messages while the worker polls: it takes every one and
    never dies decoding a message file that was not yet written."""
    app = publisher(embedded_env)
    start = threading.Barrier(PUBLISHERS)

    def publish() -> None:
        start.wait()
        for _ in range(MESSAGES // PUBLISHERS):
            with app.producer_pool.acquire(block=True) as producer:
                app.send_task("tests.embedded.take", args=("x" * PADDING,), producer=producer)

    threads = [threading.Thread(target=publish) for _ in range(PUBLISHERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    def consumed() -> int | None:
        text = worker_log.read_text()
        assert "Unrecoverable error" not in text, text[-3000:]
        done = text.count("tests.embedded.take[") and text.count("] succeeded in ")
        return done if done == MESSAGES else None

    assert MESSAGES == wait_for(consumed, timeout=60)
