"""celery-outbox: a transactional task outbox for Celery and SQLAlchemy.

Record the task in your own database transaction instead of calling ``.delay()``; a
relay publishes it after commit under a task id fixed at enqueue time.
"""

# Importing it registers the outbox-filesystem:// transport alias with kombu.
from outbox.admin.dead_letters import retry_dead
from outbox.consumers.idempotency import idempotent
from outbox.data.schema import (
    OutboxMessage,
    OutboxStatus,
    ProcessedMessage,
    create_tables,
    metadata,
    outbox_table,
)
from outbox.enqueue.options import SUPPORTED_OPTIONS
from outbox.enqueue.task_outbox import OrderedOutbox, SessionLike, TaskOutbox
from outbox.errors import (
    ArgumentNotSerializableError,
    IdempotencyError,
    InvalidOptionError,
    InvalidOrderingKeyError,
    InvalidSearchError,
    InvalidSettingError,
    KeyNotBlockedError,
    MissingSessionError,
    OrderingNotTrackedError,
    OutboxError,
    PayloadTooLargeError,
    QueueNotDeclaredError,
    TaskNotRegisteredError,
    UnsupportedDatabaseError,
    UnsupportedOptionError,
)
from outbox.maintenance.confirmation import ConfirmationResult
from outbox.maintenance.heartbeat import RelayKind
from outbox.observability.stats import OutboxStats, collect_stats
from outbox.ordering.keys import KeyState, OnFailure, UnblockAction, active_keys, unblock
from outbox.relays.batch import BatchResult, DrainResult, Relay
from outbox.settings import OutboxSettings
from outbox.transient import is_transient_database_error
from outbox.transports.filesystem import (
    FILESYSTEM_TRANSPORT,
    FilesystemChannel,
    FilesystemTransport,
)

__all__ = [
    "FILESYSTEM_TRANSPORT",
    "SUPPORTED_OPTIONS",
    "ArgumentNotSerializableError",
    "BatchResult",
    "ConfirmationResult",
    "DrainResult",
    "FilesystemChannel",
    "FilesystemTransport",
    "IdempotencyError",
    "InvalidOptionError",
    "InvalidOrderingKeyError",
    "InvalidSearchError",
    "InvalidSettingError",
    "KeyNotBlockedError",
    "KeyState",
    "MissingSessionError",
    "OnFailure",
    "OrderedOutbox",
    "OrderingNotTrackedError",
    "OutboxError",
    "OutboxMessage",
    "OutboxSettings",
    "OutboxStats",
    "OutboxStatus",
    "PayloadTooLargeError",
    "ProcessedMessage",
    "QueueNotDeclaredError",
    "Relay",
    "RelayKind",
    "SessionLike",
    "TaskNotRegisteredError",
    "TaskOutbox",
    "UnblockAction",
    "UnsupportedDatabaseError",
    "UnsupportedOptionError",
    "active_keys",
    "collect_stats",
    "create_tables",
    "idempotent",
    "is_transient_database_error",
    "metadata",
    "outbox_table",
    "retry_dead",
    "unblock",
]
