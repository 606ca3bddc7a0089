"""The outbox table, its indexes and NOTIFY trigger, and the processed-messages table.

Revision ID: outbox_0001
Revises:
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql, postgresql

revision = "outbox_0001"
down_revision = None
branch_labels = ("outbox",)
depends_on = None

# UTC timestamps with microseconds, and 32 hex characters for a task id, on MariaDB and
# MySQL (whatever the URL's scheme would pick); SQLAlchemy's defaults elsewhere.
TIMESTAMP = sa.DateTime(timezone=True).with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
TASK_ID = sa.Uuid().with_variant(sa.Uuid(native_uuid=False), "mysql", "mariadb")

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
BIGINT_PK = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
STATUS = sa.Enum(
    "pending",
    "dispatched",
    "dead",
    name="outboxstatus",
    native_enum=False,
    create_constraint=False,
    length=16,
)


def upgrade() -> None:
    op.create_table(
        "celery_outbox",
        sa.Column("id", BIGINT_PK, autoincrement=True, nullable=False),
        sa.Column("task_id", TASK_ID, nullable=False),
        sa.Column("task_name", sa.String(255), nullable=False),
        sa.Column("args", JSON, nullable=False),
        sa.Column("kwargs", JSON, nullable=False),
        sa.Column("options", JSON, nullable=False),
        sa.Column("status", STATUS, nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.Column("available_at", TIMESTAMP, nullable=False),
        sa.Column("dispatched_at", TIMESTAMP, nullable=True),
        sa.Column("confirm_deadline", TIMESTAMP, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_celery_outbox"),
        sa.UniqueConstraint("task_id", name="uq_celery_outbox_task_id"),
    )
    op.create_index(
        "ix_celery_outbox_pending_due",
        "celery_outbox",
        ["available_at", "id"],
        postgresql_where=sa.text("status = 'pending'"),
        sqlite_where=sa.text("status = 'pending'"),
    )
    op.create_index(
        "ix_celery_outbox_dispatched_at",
        "celery_outbox",
        ["dispatched_at"],
        postgresql_where=sa.text("status = 'dispatched'"),
        sqlite_where=sa.text("status = 'dispatched'"),
    )
    op.create_index(
        "ix_celery_outbox_confirm_deadline",
        "celery_outbox",
        ["confirm_deadline"],
        postgresql_where=sa.text("confirm_deadline IS NOT NULL"),
        sqlite_where=sa.text("confirm_deadline IS NOT NULL"),
    )
    op.create_table(
        "celery_outbox_processed",
        sa.Column("task_id", sa.String(255), nullable=False),
        sa.Column("task_name", sa.String(255), nullable=False),
        sa.Column("processed_at", TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("task_id", name="pk_celery_outbox_processed"),
    )
    op.create_index(
        "ix_celery_outbox_processed_processed_at",
        "celery_outbox_processed",
        ["processed_at"],
    )
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            """
            CREATE OR REPLACE FUNCTION celery_outbox_notify() RETURNS trigger
            LANGUAGE plpgsql AS $$
            BEGIN
                PERFORM pg_notify('celery_outbox', '');
                RETURN NULL;
            END $$
            """
        )
        op.execute(
            """
            CREATE TRIGGER celery_outbox_notify AFTER INSERT ON celery_outbox
            FOR EACH STATEMENT EXECUTE FUNCTION celery_outbox_notify()
            """
        )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS celery_outbox_notify ON celery_outbox")
        op.execute("DROP FUNCTION IF EXISTS celery_outbox_notify()")
    op.drop_table("celery_outbox_processed")
    op.drop_table("celery_outbox")
