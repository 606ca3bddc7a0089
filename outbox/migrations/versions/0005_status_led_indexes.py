"""The indexes on a status lead with it, and the busy keys' with ``head_since``, so that
they serve MariaDB and MySQL too.

Where partial indexes exist (PostgreSQL, SQLite) an index still holds only the rows of
its status, and the leading column costs a few bytes per entry. MariaDB and MySQL have
no partial indexes: there the same index holds every row, and the leading status takes
a lookup straight to the rows it wants.

On a large PostgreSQL table, the dispatched rows' index is rebuilt inside this
migration's transaction, which blocks writes to the table while it builds; build it
beforehand with ``CREATE INDEX CONCURRENTLY`` under a temporary name if that matters.

Revision ID: outbox_0005
Revises: outbox_0004
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "outbox_0005"
down_revision = "outbox_0004"
branch_labels = None
depends_on = None

#: Index name -> (status, the columns after it).
STATUS_INDEXES = {
    "ix_celery_outbox_pending_due": ("pending", ["available_at", "id"]),
    "ix_celery_outbox_held": ("held", ["ordering_key", "ordering_seq"]),
    "ix_celery_outbox_dead": ("dead", ["created_at", "id"]),
    "ix_celery_outbox_dispatched_at": ("dispatched", ["dispatched_at"]),
}


def _recreate(name: str, status: str, columns: list[str]) -> None:
    where = sa.text(f"status = '{status}'")
    op.drop_index(name, table_name="celery_outbox")
    op.create_index(name, "celery_outbox", columns, postgresql_where=where, sqlite_where=where)


def _recreate_busy_keys(columns: list[str]) -> None:
    where = sa.text("head_seq IS NOT NULL")
    op.drop_index("ix_celery_outbox_keys_busy", table_name="celery_outbox_keys")
    op.create_index(
        "ix_celery_outbox_keys_busy",
        "celery_outbox_keys",
        columns,
        postgresql_where=where,
        sqlite_where=where,
    )


def upgrade() -> None:
    for name, (status, columns) in STATUS_INDEXES.items():
        _recreate(name, status, ["status", *columns])
    # The key keeper walks the busy keys oldest first; NULL (idle) leads where the index
    # holds every key.
    _recreate_busy_keys(["head_since", "key"])


def downgrade() -> None:
    for name, (status, columns) in STATUS_INDEXES.items():
        _recreate(name, status, columns)
    _recreate_busy_keys(["key"])
