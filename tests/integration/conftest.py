import pytest


@pytest.fixture(autouse=True)
def _each_test_starts_empty(empty_tables: None) -> None:
    """Every integration test starts with empty tables (see ``tests.services``)."""
