"""A headless Chromium (Debian's ``chromium`` package, driven by Playwright) pointed at
the example app, served over HTTP from a thread on this run's PostgreSQL database.

Playwright never downloads a browser here: the system's Chromium is launched by path.
A machine without it fails these tests rather than skipping them.
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator

import pytest
from flask import Flask
from playwright.sync_api import Browser, sync_playwright
from werkzeug.serving import make_server

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
]


@pytest.fixture(autouse=True)
def _each_test_starts_empty(empty_tables: None) -> None:
    """Every browser test starts with empty tables (see ``tests.services``)."""


@pytest.fixture(scope="session")
def chromium_path() -> str:
    path = shutil.which("chromium")
    if path is None:
        pytest.fail(
            "Chromium is not installed: the browser tests need Debian's chromium package "
            "(apt-get install chromium); they never download a browser."
        )
    return path


@pytest.fixture(scope="session")
def browser(chromium_path: str) -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="session")
def base_url(app: Flask) -> Iterator[str]:
    """The example app served by werkzeug from a thread, on a free port."""
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, name="web-server", daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    thread.join(timeout=10)
    server.server_close()
