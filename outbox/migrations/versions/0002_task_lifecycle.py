"""Lifecycle columns: what happened to each task after it was published.

Revision ID: outbox_0002
Revises: outbox_0001
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "outbox_0002"
down_revision = "outbox_0001"
branch_labels = None
depends_on = None

# UTC timestamps with microseconds, and 32 hex characters for a task id, on MariaDB and
# MySQL (whatever the URL's scheme would pick); SQLAlchemy's defaults elsewhere.
TIMESTAMP = sa.DateTime(timezone=True).with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")


def upgrade() -> None:
    # Nullable columns, and one with a constant default: PostgreSQL adds them without
    # rewriting the table, so this is quick on a large outbox.
    with op.batch_alter_table("celery_outbox") as batch:
        batch.add_column(sa.Column("task_state", sa.String(16), nullable=True))
        batch.add_column(sa.Column("task_started_at", TIMESTAMP, nullable=True))
        batch.add_column(sa.Column("task_finished_at", TIMESTAMP, nullable=True))
        batch.add_column(sa.Column("task_error", sa.Text(), nullable=True))
        batch.add_column(
            sa.Column("task_runs", sa.Integer(), nullable=False, server_default=sa.text("0"))
        )


def downgrade() -> None:
    with op.batch_alter_table("celery_outbox") as batch:
        for column in ("task_runs", "task_error", "task_finished_at", "task_started_at"):
            batch.drop_column(column)
        batch.drop_column("task_state")
