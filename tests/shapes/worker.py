"""``celery -A tests.shapes.worker worker``: the shapes app, with the outbox's lifecycle
tracking in its workers, as the outbox's documentation wires it without Flask."""

from __future__ import annotations

from typing import Any

from celery.signals import worker_init

from outbox.consumers.lifecycle import LifecycleTracker
from tests.shapes.app import app_from_environment

app = app_from_environment()


@worker_init.connect
def track_lifecycle(sender: Any = None, **_: Any) -> None:
    if getattr(sender, "app", None) is app:
        LifecycleTracker(lambda: app.conf.shapes_database.engine).connect()
