"""The relay loop on SQLite: polls, drains, stops when asked."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from outbox import OutboxStatus, Relay, TaskOutbox
from outbox.relays.loop import RelayLoop
from tests.unit.conftest import count_rows


def test_polling_loop_publishes_and_stops(
    relay: Relay, tasks: TaskOutbox, session: Session, engine: Engine
) -> None:
    """Rows committed while the loop runs are published within a poll or two."""
    loop = RelayLoop(relay, poll_interval=0.02)
    drained = threading.Event()
    thread = threading.Thread(
        target=loop.run, kwargs={"on_drain": lambda r: r.published and drained.set()}
    )
    thread.start()
    try:
        tasks.delay("unit.add", 1, 2)
        session.commit()
        assert drained.wait(timeout=5)
        assert 1 == count_rows(engine, status=OutboxStatus.DISPATCHED)
    finally:
        loop.stop()
        thread.join(timeout=5)
    assert not thread.is_alive()


def test_poll_interval_must_be_positive(relay: Relay) -> None:
    """A zero interval would spin; it is refused."""
    with pytest.raises(ValueError, match="poll_interval=0"):
        RelayLoop(relay, poll_interval=0)
