"""``flask --app webapp accidents``: each accident happens with .delay(), none through the
outbox, on the embedded default with no server (the environment's broker and database
are ignored)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
#: Bounds a broken run; a healthy one takes well under a minute.
TIMEOUT = 180


def test_the_accidents_happen_with_delay_and_not_with_the_outbox(tmp_path: Path) -> None:
    env = {
        **os.environ,
        # Pointed at servers that do not exist: the demo must not need them.
        "DATABASE_URL": "postgresql+psycopg://nobody@127.0.0.1:1/none",
        "CELERY_BROKER_URL": "redis://127.0.0.1:1/0",
        "CELERY_RESULT_BACKEND": "redis://127.0.0.1:1/0",
        "TMPDIR": str(tmp_path),
    }
    result = subprocess.run(
        [sys.executable, "-m", "flask", "--app", "webapp", "accidents", "--json"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert 0 == result.returncode, result.stdout + result.stderr
    figures = json.loads(result.stdout)
    lost, double, order = figures["lost_send"], figures["double_send"], figures["broken_order"]
    # With .delay(): every notice published while the broker was down is lost, every one
    # whose acknowledgement was lost is applied twice, and some notices overtake others.
    assert lost["orders"] == lost["delay"] == lost["delay_publish_errors"]
    assert double["orders"] == double["delay"]
    assert 2 * double["orders"] == double["delay_messages_on_the_broker"]
    assert order["delay"] > 0
    assert order["example_delay_timeline"] != ["confirmed", "shipped", "delivered"]
    # Through the outbox: none of it. Each notice waited for the broker, was delivered
    # twice and applied once, and kept its order.
    assert (0, 0, 0) == (lost["outbox"], double["outbox"], order["outbox"])
    assert lost["orders"] == lost["outbox_waited_for_the_broker"]
    assert 2 * double["orders"] == double["outbox_messages_on_the_broker"]
    assert not list(tmp_path.iterdir()), "the demo's temporary folder is removed"
