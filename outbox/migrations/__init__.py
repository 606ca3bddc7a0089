"""Alembic migrations for the outbox's tables, to run from an application's own Alembic.

Add the outbox's versions to your ``alembic.ini`` (or Flask-Migrate's) and upgrade its
branch with yours::

    version_locations = %(here)s/versions outbox:migrations/versions   # or VERSIONS_DIR
    $ alembic upgrade heads

The revisions form their own branch (label ``outbox``), so they never interleave with
the application's history. Include ``outbox.metadata`` in ``target_metadata`` so
autogenerate leaves the outbox's tables alone.
"""

from __future__ import annotations

from pathlib import Path

#: The directory to list in Alembic's ``version_locations``.
VERSIONS_DIR = Path(__file__).parent / "versions"

__all__ = ["VERSIONS_DIR"]
