"""The wake-up reads a sequence in the trigger's WHEN instead of a table in its function.

On PostgreSQL the INSERT trigger notified from a function that read
``celery_outbox_listeners``; calling that function and running its query on every
INSERT cost 64 concurrent writers about 10 % of their rate. The relays now keep the
number of waiting listeners in the sequence ``celery_outbox_waiting`` as well, and the
trigger's ``WHEN`` reads it with ``pg_sequence_last_value``: an INSERT while no relay
waits calls nothing. Relays of an earlier version do not keep the sequence: with them,
writers notify only while a relay of this version waits, and the earlier ones find new
rows at their poll interval; upgrade the relays with this migration.

Revision ID: outbox_0007
Revises: outbox_0006
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "outbox_0007"
down_revision = "outbox_0006"
branch_labels = None
depends_on = None

SEQUENCE = "celery_outbox_waiting"


def _function(body: str) -> str:
    return f"""
        CREATE OR REPLACE FUNCTION celery_outbox_notify() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            {body}
            RETURN NULL;
        END $$
        """


def _trigger(when: str) -> str:
    return f"""
        CREATE TRIGGER celery_outbox_notify AFTER INSERT ON celery_outbox
        FOR EACH STATEMENT {when} EXECUTE FUNCTION celery_outbox_notify()
        """


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(f"CREATE SEQUENCE IF NOT EXISTS {SEQUENCE} MINVALUE 0 START 0")
    op.execute(f"GRANT SELECT ON SEQUENCE {SEQUENCE} TO PUBLIC")
    op.execute(_function("PERFORM pg_notify('celery_outbox', '');"))
    op.execute("DROP TRIGGER IF EXISTS celery_outbox_notify ON celery_outbox")
    op.execute(_trigger(f"WHEN (pg_sequence_last_value('{SEQUENCE}') > 0)"))
    # Relays waiting now keep writers notifying until they next change their state.
    op.execute("LOCK TABLE celery_outbox_listeners IN SHARE ROW EXCLUSIVE MODE")
    op.execute(
        sa.text(
            "SELECT setval(CAST(:sequence AS regclass),"
            " (SELECT count(*) FROM celery_outbox_listeners WHERE waiting), true)"
        ).bindparams(sequence=SEQUENCE)
    )


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("DROP TRIGGER IF EXISTS celery_outbox_notify ON celery_outbox")
    op.execute(
        _function(
            """IF EXISTS (SELECT FROM celery_outbox_listeners WHERE waiting) THEN
                PERFORM pg_notify('celery_outbox', '');
            END IF;"""
        )
    )
    op.execute(_trigger(""))
    op.execute(f"DROP SEQUENCE IF EXISTS {SEQUENCE}")
