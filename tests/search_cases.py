"""Rows and searches shared by the tests of ``outbox.admin.search`` on every database."""

from __future__ import annotations

import uuid
from decimal import Decimal
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from outbox import TaskOutbox

CUSTOMER = uuid.UUID("4f9c2a51-8d3e-4b7a-9c1f-2e6d5a8b0c37")

#: Rows by label: the (args, kwargs) each is enqueued with.
ROWS: dict[str, tuple[list[Any], dict[str, Any]]] = {
    "int": ([42], {}),
    "text": (["42"], {}),
    "kwarg": ([], {"order_id": 42}),
    "real": ([42.0, "BOOK-1"], {}),
    "lookalikes": ([420, "x42"], {"note": "42 items"}),
    "nested": ([[42]], {"ids": [42], "order": {"id": 42}}),
    "uuid": ([CUSTOMER], {}),
    "uuid_text": ([], {"customer": str(CUSTOMER)}),
    "decimal": ([Decimal("4.50")], {}),
    "email": (["ada@example.com"], {"cc": "bob@example.com"}),
}

#: Search text -> labels of the rows it finds. An argument matches when it equals the
#: value; nested values and substrings do not.
CASES: list[tuple[str, set[str]]] = [
    ("42", {"int", "text", "kwarg", "real"}),
    ("42.0", {"int", "kwarg", "real"}),
    ("BOOK-1", {"real"}),
    ("x42", {"lookalikes"}),
    ("42 items", {"lookalikes"}),
    ("ada@example.com", {"email"}),
    ("bob@example.com", {"email"}),
    (str(CUSTOMER), {"uuid", "uuid_text"}),
    (str(CUSTOMER).upper(), {"uuid", "uuid_text"}),
    ("4.50", {"decimal"}),
    ("nobody", set()),
]


def enqueue_rows(engine: Engine, tasks: TaskOutbox, task_name: str) -> dict[str, str]:
    """Enqueue every row of ``ROWS``; return each label's task id."""
    ids = {}
    with Session(engine) as session:
        for label, (args, kwargs) in ROWS.items():
            result = tasks.apply_async(task_name, args=args, kwargs=kwargs, session=session)
            ids[label] = result.id
        session.commit()
    return ids
