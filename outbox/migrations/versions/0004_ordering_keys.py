"""Per-key ordering: the rows' ordering key and sequence number, and the keys' table.

Revision ID: outbox_0004
Revises: outbox_0003
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "outbox_0004"
down_revision = "outbox_0003"
branch_labels = None
depends_on = None

# UTC timestamps with microseconds, and 32 hex characters for a task id, on MariaDB and
# MySQL (whatever the URL's scheme would pick); SQLAlchemy's defaults elsewhere.
TIMESTAMP = sa.DateTime(timezone=True).with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")


def upgrade() -> None:
    with op.batch_alter_table("celery_outbox") as batch:
        batch.add_column(sa.Column("ordering_key", sa.String(255), nullable=True))
        batch.add_column(sa.Column("ordering_seq", sa.BigInteger(), nullable=True))
    op.create_index(
        "ix_celery_outbox_ordering",
        "celery_outbox",
        ["ordering_key", "ordering_seq"],
        postgresql_where=sa.text("ordering_key IS NOT NULL"),
        sqlite_where=sa.text("ordering_key IS NOT NULL"),
    )
    op.create_index(
        "ix_celery_outbox_held",
        "celery_outbox",
        ["ordering_key", "ordering_seq"],
        postgresql_where=sa.text("status = 'held'"),
        sqlite_where=sa.text("status = 'held'"),
    )
    op.create_table(
        "celery_outbox_keys",
        sa.Column("key", sa.String(255), nullable=False),
        sa.Column("last_seq", sa.BigInteger(), nullable=False),
        sa.Column("head_seq", sa.BigInteger(), nullable=True),
        sa.Column("head_since", TIMESTAMP, nullable=True),
        sa.Column("blocked_at", TIMESTAMP, nullable=True),
        sa.Column("blocked_reason", sa.Text(), nullable=True),
        sa.Column("updated_at", TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("key", name="pk_celery_outbox_keys"),
    )
    op.create_index(
        "ix_celery_outbox_keys_blocked",
        "celery_outbox_keys",
        ["blocked_at"],
        postgresql_where=sa.text("blocked_at IS NOT NULL"),
        sqlite_where=sa.text("blocked_at IS NOT NULL"),
    )
    op.create_index(
        "ix_celery_outbox_keys_busy",
        "celery_outbox_keys",
        ["key"],
        postgresql_where=sa.text("head_seq IS NOT NULL"),
        sqlite_where=sa.text("head_seq IS NOT NULL"),
    )
    op.create_index(
        "ix_celery_outbox_keys_idle",
        "celery_outbox_keys",
        ["updated_at"],
        postgresql_where=sa.text("head_seq IS NULL"),
        sqlite_where=sa.text("head_seq IS NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_celery_outbox_keys_idle", table_name="celery_outbox_keys")
    op.drop_index("ix_celery_outbox_keys_busy", table_name="celery_outbox_keys")
    op.drop_index("ix_celery_outbox_keys_blocked", table_name="celery_outbox_keys")
    op.drop_table("celery_outbox_keys")
    op.drop_index("ix_celery_outbox_held", table_name="celery_outbox")
    op.drop_index("ix_celery_outbox_ordering", table_name="celery_outbox")
    # Held rows lose their key: they become pending and run unordered.
    op.execute("UPDATE celery_outbox SET status = 'pending' WHERE status = 'held'")
    with op.batch_alter_table("celery_outbox") as batch:
        batch.drop_column("ordering_seq")
        batch.drop_column("ordering_key")
