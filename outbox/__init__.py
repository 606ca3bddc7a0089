"""celery-outbox: a transactional task outbox for Celery and SQLAlchemy.

Record the task in your own database transaction instead of calling ``.delay()``; a
relay publishes it after commit under a task id fixed at enqueue time.
"""

from outbox.dead_letters import retry_dead
from outbox.enqueue import SessionLike, TaskOutbox
from outbox.errors import (
    ArgumentNotSerializableError,
    IdempotencyError,
    InvalidOptionError,
    InvalidSearchError,
    InvalidSettingError,
    MissingSessionError,
    OutboxError,
    PayloadTooLargeError,
    TaskNotRegisteredError,
    UnsupportedOptionError,
)
from outbox.idempotency import ProcessedMessage, idempotent
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
    "IdempotencyError",
    "InvalidOptionError",
    "InvalidSearchError",
    "InvalidSettingError",
    "MissingSessionError",
    "OutboxError",
    "OutboxMessage",
    "OutboxSettings",
    "OutboxStats",
    "OutboxStatus",
    "PayloadTooLargeError",
    "ProcessedMessage",
    "Relay",
    "SessionLike",
    "TaskNotRegisteredError",
    "TaskOutbox",
    "UnsupportedOptionError",
    "collect_stats",
    "create_tables",
    "idempotent",
    "metadata",
    "outbox_table",
    "retry_dead",
]
