"""Where each row was published to, a key's places unique, and the workers' heartbeats.

``published_queue``, ``published_exchange`` and ``published_routing_key`` record the
route the relay published a row's task to (the task's own ``queue=``, ``task_routes``,
the router given the arguments): the confirmation checks look for the message where it
went, instead of working the route out again from the stored options. Rows dispatched
before this revision have none, and are looked for where their options and task route
them.

``(ordering_key, ordering_seq)`` becomes unique: a key's sequence numbers are never
reused. A database where the retention cleanup of an earlier version forgot a key while
a dead row of it was kept may hold a repeated pair; the index then cannot be built, and
the pair must be resolved by hand first (``SELECT ordering_key, ordering_seq, count(*)
FROM celery_outbox GROUP BY 1, 2 HAVING count(*) > 1``).

``task_worker`` names the worker process an ordered task started in, and
``celery_outbox_workers`` holds when each such process last beat: a key whose task's
process stopped beating is reported stuck instead of waiting for ever.

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

ROUTE_COLUMNS = ("published_queue", "published_exchange", "published_routing_key")


def _ordering_index(*, unique: bool) -> None:
    op.create_index(
        "ix_celery_outbox_ordering",
        "celery_outbox",
        ["ordering_key", "ordering_seq"],
        unique=unique,
        postgresql_where=sa.text("ordering_key IS NOT NULL"),
        sqlite_where=sa.text("ordering_key IS NOT NULL"),
    )


def upgrade() -> None:
    with op.batch_alter_table("celery_outbox") as batch:
        for name in (*ROUTE_COLUMNS, "task_worker"):
            batch.add_column(sa.Column(name, sa.String(255), nullable=True))
    op.drop_index("ix_celery_outbox_ordering", table_name="celery_outbox")
    _ordering_index(unique=True)
    op.create_table(
        "celery_outbox_workers",
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("last_seen_at", TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_celery_outbox_workers"),
    )
    # The brokers' check count, to notice a broker restored from an older copy of its data.
    with op.batch_alter_table("celery_outbox_brokers") as batch:
        batch.add_column(sa.Column("epoch", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("celery_outbox_brokers") as batch:
        batch.drop_column("epoch")
    op.drop_table("celery_outbox_workers")
    op.drop_index("ix_celery_outbox_ordering", table_name="celery_outbox")
    _ordering_index(unique=False)
    with op.batch_alter_table("celery_outbox") as batch:
        for name in (*ROUTE_COLUMNS, "task_worker"):
            batch.drop_column(name)
