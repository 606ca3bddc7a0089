"""Telling "the database was not there" apart from "the code failed".

A task that fails because its database connection was refused, dropped or reset has
not run: its effects rolled back with the connection, and running it again once the
database is back is the right thing to do. A task that fails for any other reason
failed on its own, and running it again would only fail again. Web requests make the
same split: the first deserves a 503 and a retry, the second a 500.
"""

from __future__ import annotations

from collections.abc import Iterator

from sqlalchemy.exc import (
    DBAPIError,
    DisconnectionError,
    InterfaceError,
    OperationalError,
)
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

#: SQLAlchemy's wrappers for failures of the connection rather than of the statement:
#: connect refused or timed out, server shut down or restarted, connection reset or
#: closed, no connection free in the pool, and the database's own transient refusals
#: (deadlock, serialization failure, statement timeout), which PEP 249 files under
#: OperationalError too.
_TRANSIENT = (OperationalError, InterfaceError, DisconnectionError, PoolTimeoutError)


def is_transient_database_error(error: BaseException) -> bool:
    """Whether ``error``, or an exception it was raised from, means the database could
    not be reached or dropped the connection, rather than that the code was wrong."""
    for cause in _causes(error):
        if isinstance(cause, DBAPIError) and cause.connection_invalidated:
            return True
        if isinstance(cause, _TRANSIENT):
            return True
    return False


def _causes(error: BaseException) -> Iterator[BaseException]:
    """``error`` and the exceptions it was raised from or during, each once."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__
