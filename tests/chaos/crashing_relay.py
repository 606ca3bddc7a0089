"""A relay that exits hard after publishing N messages, before marking them.

``python -m tests.chaos.crashing_relay N`` drains the example app's outbox with the
relay's ``after_publish`` hook armed: the process dies between publishing a batch and
committing its mark, exactly the window that makes delivery at-least-once. It lives in
the tests because nothing in production should be able to do this.
"""

from __future__ import annotations

import os
import sys

from outbox import Relay
from tasks.application import flask_app
from webapp.extensions import db, outbox

EXIT_CODE = 70


def main(limit: int) -> None:
    published = 0

    def count_and_maybe_crash() -> None:
        nonlocal published
        published += 1
        if published >= limit:
            os._exit(EXIT_CODE)

    with flask_app().app_context():
        state = outbox.state
        relay = Relay(
            db.engine, state.celery_app, state.settings, after_publish=count_and_maybe_crash
        )
        relay.drain()
    sys.exit(f"drained without reaching {limit} publishes")


if __name__ == "__main__":
    main(int(sys.argv[1]))
