"""A task that does nothing, for the embedded broker's test worker (``--include``): the
test counts messages consumed, not what a task applies."""

from __future__ import annotations

from typing import Any

from tasks.application import app


@app.task(name="tests.embedded.take")
def take(_padding: str, **_: Any) -> None:
    """Consumes one message; the padding only makes each message file take longer to
    write, as a real task's arguments do."""
