"""The example's Celery app: ``celery -A tasks worker|beat|flower``."""

from tasks import orders, sweep
from tasks.application import app

__all__ = ["app", "orders", "sweep"]
