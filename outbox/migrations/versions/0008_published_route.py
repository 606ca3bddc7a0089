"""Where each row was published to, and a key's places unique.

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

Revision ID: outbox_0008
Revises: outbox_0007
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "outbox_0008"
down_revision = "outbox_0007"
branch_labels = None
depends_on = None

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
        for name in ROUTE_COLUMNS:
            batch.add_column(sa.Column(name, sa.String(255), nullable=True))
    op.drop_index("ix_celery_outbox_ordering", table_name="celery_outbox")
    _ordering_index(unique=True)


def downgrade() -> None:
    op.drop_index("ix_celery_outbox_ordering", table_name="celery_outbox")
    _ordering_index(unique=False)
    with op.batch_alter_table("celery_outbox") as batch:
        for name in ROUTE_COLUMNS:
            batch.drop_column(name)
