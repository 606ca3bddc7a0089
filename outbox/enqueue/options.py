"""Which ``apply_async`` options the outbox honours, and how each is stored.

Scheduling options (``countdown``, ``eta``) are *not* handed to the broker: they set the
row's ``available_at`` and the relay publishes the task when it is due, so a delayed task
survives broker restarts and never sits in a worker's memory as an ETA message.
Everything else is stored as given and passed to ``apply_async`` at publish time.
Unknown options are refused rather than dropped, because a silently ignored ``link`` or
``serializer`` is a bug the caller would only find in production.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from outbox.enqueue.serialization import to_wire
from outbox.errors import InvalidOptionError, UnsupportedOptionError

#: Options stored with the row and passed to ``apply_async`` when the row is published.
PUBLISH_OPTIONS = frozenset(
    {"expires", "queue", "routing_key", "priority", "headers", "time_limit", "soft_time_limit"}
)
#: Options that decide when the row becomes due.
SCHEDULE_OPTIONS = frozenset({"countdown", "eta"})
SUPPORTED_OPTIONS = PUBLISH_OPTIONS | SCHEDULE_OPTIONS

_WHY_UNSUPPORTED = {
    "task_id": "the outbox assigns the task id when the row is written, so it is the same "
    "on every publish attempt",
    "serializer": "the outbox publishes JSON only",
    "link": "callbacks are not stored in the outbox: enqueue the follow-up task from the "
    "task itself",
    "link_error": "error callbacks are not stored in the outbox: handle failure in the task",
    "retry": "the relay retries publishing itself",
    "retry_policy": "the relay retries publishing itself",
    "producer": "the relay publishes with its own producer",
    "connection": "the relay publishes with its own connection",
}


@dataclass(frozen=True, slots=True)
class ResolvedOptions:
    """Options split into when to publish and what to publish with."""

    available_at: datetime
    publish: dict[str, Any]


def resolve_options(options: Mapping[str, Any], now: datetime) -> ResolvedOptions:
    """Validate ``apply_async`` options and resolve relative times against ``now``."""
    unknown = sorted(set(options) - SUPPORTED_OPTIONS)
    if unknown:
        name = unknown[0]
        why = _WHY_UNSUPPORTED.get(name, "it is not one the outbox can store and replay")
        raise UnsupportedOptionError(
            f"apply_async option {name!r}={options[name]!r} is not supported by the outbox: "
            f"{why}. Supported options: {', '.join(sorted(SUPPORTED_OPTIONS))}."
        )
    if options.get("countdown") is not None and options.get("eta") is not None:
        raise InvalidOptionError(
            f"countdown={options['countdown']!r} and eta={options['eta']!r} were both given: "
            "pass one of them."
        )

    available_at = now
    if options.get("countdown") is not None:
        available_at = now + timedelta(seconds=_seconds("countdown", options["countdown"]))
    elif options.get("eta") is not None:
        available_at = max(now, _aware("eta", options["eta"]))

    publish: dict[str, Any] = {}
    for name in sorted(PUBLISH_OPTIONS & set(options)):
        value = options[name]
        if value is None:
            continue
        publish[name] = _publish_value(name, value, now)
    return ResolvedOptions(available_at=available_at, publish=publish)


def _publish_value(name: str, value: Any, now: datetime) -> Any:
    if name == "expires":
        # Celery reads a number as "seconds from the apply_async call". The call is now,
        # the publish may be much later, so store the absolute moment.
        if isinstance(value, datetime):
            expires = _aware("expires", value)
        else:
            expires = now + timedelta(seconds=_seconds("expires", value))
        return expires.isoformat()
    if name in {"queue", "routing_key"}:
        if not isinstance(value, str) or not value:
            raise InvalidOptionError(f"{name}={value!r} must be a non-empty string.")
        return value
    if name == "priority":
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 255:
            raise InvalidOptionError(f"priority={value!r} must be an integer from 0 to 255.")
        return value
    if name == "headers":
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            raise InvalidOptionError(f"headers={value!r} must be a mapping with string keys.")
        return to_wire(dict(value), where="headers")
    # time_limit / soft_time_limit
    return _seconds(name, value)


#: Ten years: longer delays overflow datetime arithmetic and are surely a unit mistake.
MAX_SECONDS = 10 * 365 * 24 * 3600


def _seconds(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidOptionError(f"{name}={value!r} must be a number of seconds.")
    if not (isinstance(value, int) or math.isfinite(value)):
        raise InvalidOptionError(f"{name}={value!r} must be a number of seconds.")
    if value < 0:
        raise InvalidOptionError(f"{name}={value!r} must not be negative.")
    if value > MAX_SECONDS:
        raise InvalidOptionError(
            f"{name}={value!r} is over ten years: pass seconds (not milliseconds)."
        )
    return float(value)


def _aware(name: str, value: Any) -> datetime:
    if not isinstance(value, datetime):
        raise InvalidOptionError(f"{name}={value!r} must be a datetime.")
    if value.tzinfo is None or value.utcoffset() is None:
        raise InvalidOptionError(
            f"{name}={value!r} is a naive datetime: pass a timezone-aware one, "
            "e.g. datetime.now(UTC) + timedelta(minutes=5)."
        )
    return value
