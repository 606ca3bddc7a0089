"""Committing enqueues notify only while a relay waits: the relays' listener table.

On PostgreSQL the INSERT trigger's function now reads ``celery_outbox_listeners`` and
sends its NOTIFY only while a relay says it waits on LISTEN (``outbox.wakeups``). Relays
of an earlier version do not register: with them, writers notify only while a relay of
this version waits, and the earlier ones find new rows at their poll interval; upgrade
the relays with this migration.

Revision ID: outbox_0006
Revises: outbox_0005
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "outbox_0006"
down_revision = "outbox_0005"
branch_labels = None
depends_on = None

TIMESTAMP = sa.DateTime(timezone=True).with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")


def _notify_function(body: str) -> str:
    return f"""
        CREATE OR REPLACE FUNCTION celery_outbox_notify() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            {body}
            RETURN NULL;
        END $$
        """


def upgrade() -> None:
    op.create_table(
        "celery_outbox_listeners",
        sa.Column("pid", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("backend_start", TIMESTAMP, nullable=False),
        sa.Column("relay", sa.String(255), nullable=False),
        sa.Column("waiting", sa.Boolean(), nullable=False),
        sa.Column("updated_at", TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("pid", name="pk_celery_outbox_listeners"),
    )
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            _notify_function(
                """IF EXISTS (SELECT FROM celery_outbox_listeners WHERE waiting) THEN
                PERFORM pg_notify('celery_outbox', '');
            END IF;"""
            )
        )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_notify_function("PERFORM pg_notify('celery_outbox', '');"))
    op.drop_table("celery_outbox_listeners")
