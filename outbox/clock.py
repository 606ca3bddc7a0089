"""The one clock the library reads: timezone-aware UTC, replaceable in tests.

Every component that compares times (enqueue, relay, confirmation, lifecycle) takes a
``clock`` callable defaulting to :func:`utcnow`, so a test can move time by hand instead
of sleeping, and naive datetimes never enter the library.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import TypeAlias

#: What components accept as their clock.
Clock: TypeAlias = Callable[[], datetime]


def utcnow() -> datetime:
    """The current time, timezone-aware, in UTC."""
    return datetime.now(UTC)
