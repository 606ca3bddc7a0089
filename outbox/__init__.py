"""celery-outbox: a transactional task outbox for Celery and SQLAlchemy.

Record the task in your own database transaction instead of calling ``.delay()``; a
relay publishes it after commit under a task id fixed at enqueue time.
"""

from outbox.enqueue import SessionLike, TaskOutbox
from outbox.errors import (
    ArgumentNotSerializableError,
    InvalidOptionError,
    InvalidSettingError,
    MissingSessionError,
    OutboxError,
    TaskNotRegisteredError,
    UnsupportedOptionError,
)
from outbox.options import SUPPORTED_OPTIONS
from outbox.relay import BatchResult, DrainResult, Relay
from outbox.schema import OutboxMessage, OutboxStatus, create_tables, metadata, outbox_table
from outbox.settings import OutboxSettings
from outbox.stats import OutboxStats, collect_stats

__all__ = [
    "SUPPORTED_OPTIONS",
    "ArgumentNotSerializableError",
    "BatchResult",
    "DrainResult",
    "InvalidOptionError",
    "InvalidSettingError",
    "MissingSessionError",
    "OutboxError",
    "OutboxMessage",
    "OutboxSettings",
    "OutboxStats",
    "OutboxStatus",
    "Relay",
    "SessionLike",
    "TaskNotRegisteredError",
    "TaskOutbox",
    "UnsupportedOptionError",
    "collect_stats",
    "create_tables",
    "metadata",
    "outbox_table",
]
