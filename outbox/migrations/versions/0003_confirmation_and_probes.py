"""Deliveries apart from failed attempts, retry due times, a dead-rows index, and the
relay-liveness and broker-identity tables.

Until this revision ``attempts`` counted successful publishes as well as failures. Rows
already dispatched are taken to have been published once: that publish moves from
``attempts`` to ``deliveries``.

Revision ID: outbox_0003
Revises: outbox_0002
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "outbox_0003"
down_revision = "outbox_0002"
branch_labels = None
depends_on = None

# UTC timestamps with microseconds, and 32 hex characters for a task id, on MariaDB and
# MySQL (whatever the URL's scheme would pick); SQLAlchemy's defaults elsewhere.
TIMESTAMP = sa.DateTime(timezone=True).with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")


def upgrade() -> None:
    with op.batch_alter_table("celery_outbox") as batch:
        batch.add_column(
            sa.Column("deliveries", sa.Integer(), nullable=False, server_default=sa.text("0"))
        )
        batch.add_column(sa.Column("task_retry_eta", TIMESTAMP, nullable=True))
    op.execute(
        "UPDATE celery_outbox SET deliveries = 1, "
        "attempts = CASE WHEN attempts > 0 THEN attempts - 1 ELSE 0 END "
        "WHERE dispatched_at IS NOT NULL"
    )
    op.create_index(
        "ix_celery_outbox_dead",
        "celery_outbox",
        ["created_at", "id"],
        postgresql_where=sa.text("status = 'dead'"),
        sqlite_where=sa.text("status = 'dead'"),
    )
    op.create_table(
        "celery_outbox_relays",
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("last_seen_at", TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_celery_outbox_relays"),
    )
    op.create_table(
        "celery_outbox_brokers",
        sa.Column("broker", sa.String(255), nullable=False),
        sa.Column("data_marker", sa.String(64), nullable=False),
        sa.Column("run_id", sa.String(64), nullable=True),
        sa.Column("checked_at", TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("broker", name="pk_celery_outbox_brokers"),
    )


def downgrade() -> None:
    op.drop_table("celery_outbox_brokers")
    op.drop_table("celery_outbox_relays")
    op.drop_index("ix_celery_outbox_dead", table_name="celery_outbox")
    op.execute("UPDATE celery_outbox SET attempts = attempts + deliveries WHERE deliveries > 0")
    with op.batch_alter_table("celery_outbox") as batch:
        batch.drop_column("task_retry_eta")
        batch.drop_column("deliveries")
