"""The outbox's periodic tasks (sweep, retention cleanup), run with the worker's Flask app."""

from __future__ import annotations

from outbox.contrib.celery import register_cleanup_task, register_sweep_task
from tasks.application import app
from webapp.extensions import outbox

sweep = register_sweep_task(app, relay=lambda: outbox.relay)
cleanup = register_cleanup_task(app, relay=lambda: outbox.relay)
