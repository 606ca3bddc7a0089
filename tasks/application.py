"""The Celery app, configured from the top-level ``celeryconfig`` module."""

from __future__ import annotations

import functools
from typing import Any

from celery import Celery, Task
from celery.signals import worker_init
from flask import Flask, has_app_context


@functools.cache
def flask_app() -> Flask:
    """The Flask app a worker process runs its tasks in, built once per process."""
    from webapp import create_app

    return create_app()


class AppContextTask(Task):  # type: ignore[type-arg]
    """Runs each task inside a Flask application context, as Flask's Celery guide does.

    Tasks then use ``db.session`` and the outbox exactly like a view.
    """

    abstract = True

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if has_app_context():
            return super().__call__(*args, **kwargs)
        with flask_app().app_context():
            return super().__call__(*args, **kwargs)


app = Celery("tasks", task_cls=AppContextTask)
app.config_from_object("celeryconfig")


@worker_init.connect
def track_lifecycle(sender: Any = None, **_: Any) -> None:
    """Record each outbox task's outcome on its outbox row (``OUTBOX_TRACK_LIFECYCLE``).

    Only in this app's workers: signals are process-wide, and another app's worker in the
    same process must not write to this app's database.
    """
    if getattr(sender, "app", None) is not app:
        return
    from webapp.extensions import outbox

    outbox.track_lifecycle(flask_app())
