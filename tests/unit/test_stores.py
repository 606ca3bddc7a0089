"""Databases the outbox does not support are refused when the application starts."""

from __future__ import annotations

import pytest
from flask import Flask

from outbox.contrib.flask import Outbox
from outbox.errors import UnsupportedDatabaseError
from tests.unit.conftest import memory_app


@pytest.mark.parametrize(
    ("uri", "database"),
    [("mssql+pyodbc://sa@db/orders", "mssql"), ("oracle+oracledb://scott@db/orders", "oracle")],
)
def test_a_flask_app_on_a_database_the_outbox_does_not_support_is_refused_at_start(
    uri: str, database: str
) -> None:
    """Refused when the extension is set up, not at the relay's first batch after the
    web app wrote rows nobody could publish."""
    app = Flask("unsupported")
    app.config["SQLALCHEMY_DATABASE_URI"] = uri
    with pytest.raises(UnsupportedDatabaseError, match=f"does not support the '{database}'"):
        Outbox(app, db=object(), celery=memory_app("unsupported"))
