"""Databases the outbox does not support are refused when the application starts."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from flask import Flask

from outbox.contrib.flask import Outbox
from outbox.data import store_named
from outbox.data.mysql import MySQLStore
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


@pytest.mark.parametrize(
    ("is_mariadb", "version", "message"),
    [
        (True, (10, 5, 22), "MariaDB 10.5.22 is too old for celery-outbox"),
        (False, (5, 7, 44), "MySQL 5.7.44 is too old for celery-outbox"),
        (False, (8, 0, 3), "MySQL 8.0.3 is too old for celery-outbox"),
    ],
)
def test_a_mysql_server_too_old_for_skip_locked_is_refused(
    is_mariadb: bool, version: tuple[int, ...], message: str
) -> None:
    """Refused with the version it found and the one it needs, before any claim."""
    connection = SimpleNamespace(
        dialect=SimpleNamespace(is_mariadb=is_mariadb, server_version_info=version)
    )
    with pytest.raises(UnsupportedDatabaseError, match=message) as refused:
        MySQLStore().check_server(connection)  # type: ignore[arg-type]
    assert "Upgrade the server" in str(refused.value)


@pytest.mark.parametrize(("is_mariadb", "version"), [(True, (10, 6, 0)), (False, (8, 0, 4))])
def test_the_oldest_supported_mysql_servers_are_accepted(
    is_mariadb: bool, version: tuple[int, ...]
) -> None:
    connection = SimpleNamespace(
        dialect=SimpleNamespace(is_mariadb=is_mariadb, server_version_info=version)
    )
    MySQLStore().check_server(connection)  # type: ignore[arg-type]


def test_mysql_and_mariadb_urls_get_the_same_store() -> None:
    """``mysql+pymysql://`` and ``mariadb+pymysql://`` build the same tables."""
    assert store_named("mysql") is store_named("mariadb")
