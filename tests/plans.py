"""What the plan tests share: the statements a probe sends to the outbox's tables."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine, event

#: The tables a probe may not scan (the relays' and brokers' hold a row per process).
OUTBOX_TABLE = re.compile(r"\bcelery_outbox(_keys)?\b")


def sent_by(engine: Engine, probe: Callable[[], object]) -> list[tuple[str, Any]]:
    """The statements ``probe`` sends that read or change the outbox or keys table."""
    captured: list[tuple[str, Any]] = []

    def record(*args: Any) -> None:
        statement, parameters = args[2], args[3]
        if OUTBOX_TABLE.search(statement):
            captured.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", record)
    try:
        probe()
    finally:
        event.remove(engine, "before_cursor_execute", record)
    return captured
