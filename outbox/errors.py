"""Every error the outbox raises derives from :class:`OutboxError`.

Each subclass's docstring is its default message; raise sites add the offending value and
what to do about it, because the person reading the traceback is usually mid-request and
needs the fix, not the taxonomy.
"""

from __future__ import annotations


class OutboxError(Exception):
    """The task outbox refused an operation."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (type(self).__doc__ or "").strip())


class TaskNotRegisteredError(OutboxError):
    """The task is not registered with the Celery app, so no worker could run it."""


class ArgumentNotSerializableError(OutboxError):
    """An argument cannot be serialized with Celery's JSON serializer."""


class PayloadTooLargeError(OutboxError):
    """The task's serialized arguments exceed the configured maximum payload size."""


class UnsupportedOptionError(OutboxError):
    """An ``apply_async`` option cannot be honoured by the outbox."""


class InvalidOptionError(OutboxError):
    """An ``apply_async`` option has a value the outbox cannot use."""


class QueueNotDeclaredError(InvalidOptionError):
    """The task would go to a queue the Celery app does not declare and will not create."""


class MissingSessionError(OutboxError):
    """No database session was given and the outbox has no default session."""


class IdempotencyError(OutboxError):
    """An idempotent task managed its own transaction, which would break its guarantee."""


class InvalidSettingError(OutboxError):
    """An outbox setting has a value outside its allowed range."""


class InvalidSearchError(OutboxError):
    """A search text is not a task id or an argument value the outbox can look for."""


class UnsupportedDatabaseError(OutboxError):
    """The outbox's tables are in a database the outbox does not support."""


class InvalidOrderingKeyError(OutboxError):
    """An ordering key is not a string of 1 to 255 characters."""


class OrderingNotTrackedError(OutboxError):
    """An ordered task cannot report when it has finished, so its key could never go on."""


class KeyNotBlockedError(OutboxError):
    """The ordering key is not blocked: there is nothing to retry or skip."""


class PgoutputError(OutboxError):
    """A logical replication message could not be decoded: the bytes are not pgoutput
    protocol version 1, or were cut short. The stream must not go on past it."""


class CdcSetupError(OutboxError):
    """The database cannot feed the change-data-capture relay as it is set up: the
    message says what to change, with the SQL to run."""


class SlotInvalidatedError(OutboxError):
    """PostgreSQL invalidated the CDC relay's replication slot (it kept more WAL than
    ``max_slot_wal_keep_size`` allows): the stream cannot resume from it. The rows it
    did not publish are still pending and the polling relay publishes them; drop the slot
    (``outbox cdc drop-slot``) and start the CDC relay again to stream anew."""
