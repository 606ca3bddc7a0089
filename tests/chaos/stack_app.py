"""The example's web app, in a process that also knows the tests' tasks.

``flask --app tests.chaos.stack_app outbox relay`` is the README's relay for an app whose
tasks include ``tests.worker_tasks``: a relay publishes only the tasks its process has
registered (it routes each by its task's options), and its key keeper tells idempotent
consumers from other tasks by them, so every relay of a stack that enqueues those tasks
must import them, as the workers do with ``--include``.
"""

from __future__ import annotations

import tests.worker_tasks  # noqa: F401  (registers its tasks on the example's Celery app)
from webapp import create_app

__all__ = ["create_app"]
