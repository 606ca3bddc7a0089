"""The maintenance lease: one relay at a time runs the outbox-wide maintenance passes.

``celery_outbox_leases`` holds, per lease, the relay that holds it and until when (on
the database's clock). Relays of earlier versions ignore it and keep running every pass
themselves, as before.

Revision ID: outbox_0009
Revises: outbox_0008
Create Date: 2026-12-08
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "outbox_0009"
down_revision = "outbox_0008"
branch_labels = None
depends_on = None

# UTC timestamps with microseconds on MariaDB and MySQL, as in the earlier revisions.
TIMESTAMP = sa.DateTime(timezone=True).with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")


def upgrade() -> None:
    op.create_table(
        "celery_outbox_leases",
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("holder", sa.String(255), nullable=False),
        sa.Column("expires_at", TIMESTAMP, nullable=False),
        sa.Column("renewed_at", TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_celery_outbox_leases"),
    )


def downgrade() -> None:
    op.drop_table("celery_outbox_leases")
