"""Finding outbox rows by task id or by an argument value, for dashboards and tools.

A search text that is a UUID is looked up as a task id first. Anything else (and a UUID
no row has as its task id) is an argument value: a row matches when one of its
positional arguments, or the value of one of its keyword arguments, equals it. A numeric
text also matches the JSON number (``42`` finds ``f(42)`` as well as ``f("42")``), and a
UUID or decimal text also matches the tagged form Celery's serializer stored for a
``UUID`` or ``Decimal`` argument.

There is no index on the arguments: an argument search reads rows newest first until it
has ``limit`` matches, so on a large table one that matches little reads the whole
table. It is meant for a person looking for a task, not for application queries.
"""

from __future__ import annotations

import math
import re
import uuid
from contextlib import nullcontext
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from sqlalchemy import Row, select
from sqlalchemy.engine import Connection, Engine

from outbox.data import store_for
from outbox.data.schema import OutboxStatus, outbox_table
from outbox.enqueue.serialization import to_wire
from outbox.errors import InvalidSearchError

_t = outbox_table.c

#: Longest search text accepted: ids and argument values, not documents.
MAX_SEARCH_LENGTH = 200
#: A JSON number as a person types it (leading zeros and ``+`` allowed).
_NUMBER = re.compile(r"^[+-]?\d+(\.\d+)?([eE][+-]?\d+)?$")


@dataclass(frozen=True, slots=True)
class TaskSearch:
    """A parsed search text: the task id it may be, and the argument values it stands for."""

    text: str
    task_id: uuid.UUID | None
    #: JSON values an argument may equal: the text itself, and its number or tagged forms.
    values: tuple[Any, ...]


def parse_search(text: str) -> TaskSearch:
    """Read a search text; raise :class:`InvalidSearchError` saying what is wrong with it."""
    text = text.strip()
    if not text:
        raise InvalidSearchError("the search is empty: enter a task id or an argument value.")
    if len(text) > MAX_SEARCH_LENGTH:
        raise InvalidSearchError(
            f"the search is {len(text)} characters long; enter a task id or an argument "
            f"value of at most {MAX_SEARCH_LENGTH}."
        )
    if not text.isprintable():
        raise InvalidSearchError(
            f"the search {text!r} contains control characters; enter a task id or an "
            "argument value as plain text."
        )
    values: list[Any] = [text]
    task_id = _uuid(text)
    if task_id is not None:
        values += [str(task_id), to_wire(task_id, where="search")]
    if _NUMBER.match(text):
        number = _number(text)
        if number is not None:
            values += [number, to_wire(Decimal(text), where="search")]
    # Keep the first of duplicates (a canonical UUID text is its own str()).
    unique = [value for i, value in enumerate(values) if value not in values[:i]]
    return TaskSearch(text=text, task_id=task_id, values=tuple(unique))


def find_tasks(
    bind: Engine | Connection, search: TaskSearch, *, limit: int = 100
) -> list[Row[Any]]:
    """Rows matching ``search``, newest first, at most ``limit``.

    A task id that exists returns that row alone; otherwise the text is searched for as
    an argument value (see the module docstring).
    """
    with bind.connect() if isinstance(bind, Engine) else nullcontext(bind) as conn:
        if search.task_id is not None:
            row = conn.execute(
                select(outbox_table).where(_t.task_id == search.task_id)
            ).one_or_none()
            if row is not None:
                return [row]
        matches = store_for(conn).argument_matches(_t.args, _t.kwargs, search.values)
        query = select(outbox_table).where(matches).order_by(_t.id.desc()).limit(limit)
        return list(conn.execute(query))


def latest_dead(bind: Engine | Connection, *, limit: int = 20) -> list[Row[Any]]:
    """The most recently enqueued dead rows, newest first (read from the dead-rows index)."""
    query = (
        select(outbox_table)
        .where(_t.status == OutboxStatus.DEAD)
        .order_by(_t.created_at.desc(), _t.id.desc())
        .limit(limit)
    )
    with bind.connect() if isinstance(bind, Engine) else nullcontext(bind) as conn:
        return list(conn.execute(query))


def _uuid(text: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(text)
    except ValueError:
        return None


def _number(text: str) -> int | float | None:
    """The JSON number a numeric text stands for; ``None`` when no JSON number can be it."""
    if re.fullmatch(r"[+-]?\d+", text):
        return int(text)
    value = float(text)
    return value if math.isfinite(value) else None
