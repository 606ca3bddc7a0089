"""The README's main command, run as a new user would: it starts and serves requests."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def call(
    method: str, url: str, body: dict[str, Any] | None = None, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(  # noqa: S310 - a local http URL built by the test
        url,
        data=data,
        method=method,
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


class Stack:
    """The main command in its own process group, with its output collected."""

    def __init__(self, tmp_path: Path) -> None:
        self.port = free_port()
        env = {
            key: value
            for key, value in os.environ.items()
            if key not in {"DATABASE_URL", "CELERY_BROKER_URL", "CELERY_RESULT_BACKEND"}
        }
        env.update(
            PORT=str(self.port),
            OUTBOX_DEMO_DIR=str(tmp_path / "var"),
            # Reuse the environment the tests run in instead of building ./.venv again.
            OUTBOX_VENV=sys.prefix,
        )
        self.output: list[str] = []
        self.process = subprocess.Popen(
            ["scripts/run"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.output.append(line)

    @property
    def log(self) -> str:
        return "".join(self.output)

    def wait_for(self, check: Any, what: str, timeout: float = 60) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"scripts/run exited ({self.process.returncode}):\n{self.log}")
            try:
                value = check()
            except (ConnectionError, TimeoutError, urllib.error.URLError):
                value = None  # not up yet, or too busy starting to answer in time
            if value:
                return value
            time.sleep(0.2)
        pytest.fail(f"{what} within {timeout}s; scripts/run printed:\n{self.log}")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._reader.join(timeout=5)
        if self.process.stdout is not None:
            self.process.stdout.close()


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    stack = Stack(tmp_path)
    try:
        yield stack
    finally:
        stack.stop()


def test_readme_names_the_two_commands() -> None:
    """The README's set-up section gives exactly the run and test commands."""
    assert "scripts/run" in README
    assert "scripts/test" in README


def test_main_command_serves_orders_and_runs_their_tasks_once(stack: Stack) -> None:
    """scripts/run prints where to send requests; an order confirmed there gets its 3 effects."""
    base = f"http://127.0.0.1:{stack.port}"
    stack.wait_for(lambda: base in stack.log, "the URL to send requests to was not printed")
    new_order = {"customer_email": "ada@example.com", "items": [{"sku": "BOOK-1", "qty": 1}]}
    key = {"Idempotency-Key": "0f6c1d2e-order-1"}  # the README's
    # A request that timed out while the app starts may have made the order: the key
    # makes the retry answer with it (200) instead of making another.
    _, order = stack.wait_for(
        lambda: (
            (reply := call("POST", f"{base}/orders", new_order, key))[0] in (200, 201) and reply
        ),
        "the web app did not accept an order",
    )
    assert "pending" == order["status"]
    again = call("POST", f"{base}/orders", new_order, key)
    assert (200, order["id"]) == (again[0], again[1]["id"]), "the same key, the same order"
    assert 200 == call("POST", f"{base}/orders/{order['id']}/confirm")[0]
    stack.wait_for(
        lambda: (
            call("GET", f"{base}/orders/{order['id']}")[1]["effects"]
            == {"notification": 1, "reservation": 1, "shipment": 1}
        ),
        "beat, the sweep and the worker did not apply the three effects",
    )
