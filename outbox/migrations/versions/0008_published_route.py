"""Where each row was published to, the workers' heartbeats, and the brokers' epochs.

``published_queue``, ``published_exchange`` and ``published_routing_key`` record the
route the relay published a row's task to (the task's own ``queue=``, ``task_routes``,
the router given the arguments): the confirmation checks look for the message where it
went, instead of working the route out again from the stored options. Rows dispatched
before this revision have none, and are looked for where their options and task route
them.

``task_worker`` names the worker process an ordered task started in, and
``celery_outbox_workers`` holds when each such process last beat: a key whose task's
process stopped beating is reported stuck instead of waiting for ever.

``celery_outbox_brokers.epoch`` is the highest check count a broker reported: one that
reports a lower count was restored from an older copy of its data.

Revision ID: outbox_0008
Revises: outbox_0007
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "outbox_0008"
down_revision = "outbox_0007"
branch_labels = None
depends_on = None

# UTC timestamps with microseconds on MariaDB and MySQL, as in the earlier revisions.
TIMESTAMP = sa.DateTime(timezone=True).with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")

OUTBOX_COLUMNS = ("published_queue", "published_exchange", "published_routing_key", "task_worker")


def upgrade() -> None:
    with op.batch_alter_table("celery_outbox") as batch:
        for name in OUTBOX_COLUMNS:
            batch.add_column(sa.Column(name, sa.String(255), nullable=True))
    op.create_table(
        "celery_outbox_workers",
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("last_seen_at", TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_celery_outbox_workers"),
    )
    with op.batch_alter_table("celery_outbox_brokers") as batch:
        batch.add_column(sa.Column("epoch", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("celery_outbox_brokers") as batch:
        batch.drop_column("epoch")
    op.drop_table("celery_outbox_workers")
    with op.batch_alter_table("celery_outbox") as batch:
        for name in OUTBOX_COLUMNS:
            batch.drop_column(name)
