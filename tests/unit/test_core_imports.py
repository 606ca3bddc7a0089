"""The core stands alone: importing it loads no web framework."""

from __future__ import annotations

import subprocess
import sys


def test_the_core_imports_neither_flask_nor_any_web_framework() -> None:
    """`import outbox` (and its relay, confirmation and command line) leaves Flask and
    Werkzeug unloaded."""
    check = (
        "import sys, outbox, outbox.relays.batch, outbox.relays.loop, "
        "outbox.maintenance.confirmation, outbox.admin.cli; "
        "print(sorted(m for m in ('flask', 'werkzeug', 'flask_sqlalchemy') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", check], capture_output=True, text=True, check=True, timeout=60
    )
    assert "[]" == result.stdout.strip()
