"""One frozen settings object for the outbox, validated when it is built."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from datetime import timedelta
from typing import Any

from outbox.errors import InvalidSettingError

DEFAULT_BATCH_SIZE = 200
DEFAULT_SWEEP_INTERVAL = 1.0
DEFAULT_SWEEP_MAX_SECONDS = 10.0
DEFAULT_MAX_ATTEMPTS = 10
DEFAULT_MAX_DELIVERIES = 5
DEFAULT_RETRY_BACKOFF = 2.0
DEFAULT_RETRY_BACKOFF_MAX = 600.0
DEFAULT_MAX_PAYLOAD_BYTES = 256 * 1024
DEFAULT_CONFIRM_TIMEOUT = 3600.0
DEFAULT_PUBLISH_CONFIRM_TIMEOUT = 10.0
DEFAULT_RETENTION = 7 * 86400.0
DEFAULT_PROCESSED_RETENTION = 30 * 86400.0
DEFAULT_CDC_GRACE = 30.0

#: The values of ``ordering_on_failure`` (``outbox.ordering.keys.OnFailure``).
_ON_FAILURE = {"block", "skip"}

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


@dataclass(frozen=True, slots=True)
class OutboxSettings:
    """How the relay claims and publishes rows.

    Read from the environment or a framework's config only at the edges
    (:meth:`from_mapping` takes ``OUTBOX_*`` keys); the library itself never reads
    ``os.environ``.
    """

    #: Rows claimed, published and marked per database transaction. Larger batches
    #: amortise the claim and mark statements; smaller ones hold row locks for less time.
    batch_size: int = DEFAULT_BATCH_SIZE
    #: Seconds between two beat sweeps; also how long a queued sweep stays valid, so
    #: sweeps queued while no worker runs expire instead of piling up.
    sweep_interval: float = DEFAULT_SWEEP_INTERVAL
    #: Upper bound on one sweep's run time, so a huge backlog cannot pin a worker
    #: process: the next sweep continues where this one stopped.
    sweep_max_seconds: float = DEFAULT_SWEEP_MAX_SECONDS
    #: Failed publishes a row gets before it is marked ``dead`` (failures of the row
    #: itself: a broker outage charges nothing).
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    #: Publishes of a task whose consumer never confirms it before its row is marked
    #: ``dead`` (``outbox.maintenance.confirmation``); it comes back if the confirmation
    #: arrives later.
    max_deliveries: int = DEFAULT_MAX_DELIVERIES
    #: First retry delay in seconds after a failed publish; doubles per attempt.
    retry_backoff: float = DEFAULT_RETRY_BACKOFF
    #: Ceiling on the retry delay in seconds.
    retry_backoff_max: float = DEFAULT_RETRY_BACKOFF_MAX
    #: Largest serialized args + kwargs accepted at enqueue. Brokers cap message sizes
    #: and big payloads belong in the database, referenced by id.
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES
    #: Seconds without any sign of life (dispatch, a recorded start or retry, the broker
    #: still holding the message) after which a task no idempotent consumer has recorded
    #: is presumed lost and published again, whatever the broker. Set it above the
    #: longest queue wait plus run time: a redelivery that arrives while the first is
    #: still running waits for it and is then skipped, but it is wasted work. On Redis a
    #: lost message is found much sooner, by looking for it (``outbox.maintenance.confirmation``).
    confirm_timeout: float = DEFAULT_CONFIRM_TIMEOUT
    #: Seconds the relay waits for a broker with publisher confirms (RabbitMQ) to
    #: acknowledge a batch; what is unconfirmed then stays pending and goes out again.
    publish_confirm_timeout: float = DEFAULT_PUBLISH_CONFIRM_TIMEOUT
    #: Seconds dispatched rows are kept before the cleanup deletes them.
    retention: float = DEFAULT_RETENTION
    #: Seconds idempotent consumers remember a processed task id. Longer than any
    #: redelivery can take (the broker's visibility timeout, ``confirm_timeout``): an id
    #: forgotten too early would be applied again if it were delivered again.
    processed_retention: float = DEFAULT_PROCESSED_RETENTION
    #: Workers record each outbox task's outcome on its row (batched, off the task's path).
    track_lifecycle: bool = True
    #: Also record when a task starts, like Celery's ``task_track_started``: a second
    #: UPDATE a run, written before the task starts, so it is off by default.
    track_started: bool = False
    #: What happens to an ordering key whose task failed for good or went dead:
    #: ``block`` (its later tasks wait for ``flask outbox unblock``) or ``skip`` (the next
    #: one goes). See ``outbox.ordering.keys``.
    ordering_on_failure: str = "block"
    #: Seconds a row the CDC relay streams (enqueued with no countdown, eta or ordering
    #: key) is left to it while it runs (``outbox.relays.cdc``): polling relays and
    #: sweeps take such a row only once it is older, so the two never race for it, and a
    #: stream that stalls still costs a task no more than this.
    cdc_grace: float = DEFAULT_CDC_GRACE

    def __post_init__(self) -> None:
        _require(self.batch_size >= 1, "batch_size", self.batch_size, "an integer >= 1")
        _require(self.sweep_interval > 0, "sweep_interval", self.sweep_interval, "> 0 seconds")
        _require(
            self.sweep_max_seconds > 0, "sweep_max_seconds", self.sweep_max_seconds, "> 0 seconds"
        )
        _require(self.max_attempts >= 1, "max_attempts", self.max_attempts, "an integer >= 1")
        _require(self.max_deliveries >= 1, "max_deliveries", self.max_deliveries, "an integer >= 1")
        _require(self.retry_backoff > 0, "retry_backoff", self.retry_backoff, "> 0 seconds")
        _require(
            self.retry_backoff_max >= self.retry_backoff,
            "retry_backoff_max",
            self.retry_backoff_max,
            f"at least retry_backoff ({self.retry_backoff})",
        )

        _require(self.confirm_timeout > 0, "confirm_timeout", self.confirm_timeout, "> 0 seconds")
        _require(
            self.publish_confirm_timeout > 0,
            "publish_confirm_timeout",
            self.publish_confirm_timeout,
            "> 0 seconds",
        )
        _require(self.retention > 0, "retention", self.retention, "> 0 seconds")
        _require(
            self.processed_retention > self.confirm_timeout,
            "processed_retention",
            self.processed_retention,
            f"longer than confirm_timeout ({self.confirm_timeout:g}s)",
        )
        _require(
            self.ordering_on_failure in _ON_FAILURE,
            "ordering_on_failure",
            self.ordering_on_failure,
            " or ".join(sorted(_ON_FAILURE)),
        )
        _require(
            self.max_payload_bytes >= 1, "max_payload_bytes", self.max_payload_bytes, ">= 1 byte"
        )
        _require(self.cdc_grace > 0, "cdc_grace", self.cdc_grace, "> 0 seconds")

    @classmethod
    def from_mapping(cls, config: Mapping[str, Any], prefix: str = "OUTBOX_") -> OutboxSettings:
        """Build settings from ``OUTBOX_BATCH_SIZE``-style keys; absent keys keep defaults."""
        values: dict[str, Any] = {}
        for field in fields(cls):
            key = prefix + field.name.upper()
            if key not in config:
                continue
            raw = config[key]
            if field.type in ("bool", bool):
                values[field.name] = parse_flag(key, raw)
                continue
            if field.type in ("str", str):
                values[field.name] = str(raw).strip().lower()
                continue
            kind = int if field.type in ("int", int) else float
            try:
                values[field.name] = kind(raw)
            except (TypeError, ValueError) as e:
                if kind is float and isinstance(raw, str) and _DURATION.match(raw):
                    values[field.name] = parse_duration(raw).total_seconds()
                    continue
                raise InvalidSettingError(
                    f"{key}={raw!r} is not a valid {kind.__name__}; set it to a number"
                    + (" of seconds or a duration like 7d." if kind is float else ".")
                ) from e
        return cls(**values)


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def parse_flag(key: str, raw: object) -> bool:
    """A flag from app config or the environment, where it is often a string."""
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in _TRUE | _FALSE:
        return text in _TRUE
    raise InvalidSettingError(f"{key}={raw!r} is not a flag; set it to true or false.")


def _require(ok: bool, name: str, value: object, expected: str) -> None:
    if not ok:
        raise InvalidSettingError(
            f"OutboxSettings.{name}={value!r} is invalid: expected {expected}."
        )


def parse_duration(text: str) -> timedelta:
    """``"7d"``, ``"12h"``, ``"30m"``, ``"45s"``, ``"2w"`` (or plain seconds) as a timedelta."""
    match = _DURATION.match(text)
    if match is None:
        try:
            return timedelta(seconds=float(text))
        except ValueError:
            raise InvalidSettingError(
                f"duration {text!r} is not understood: write a number and a unit, e.g. 7d, "
                "12h, 30m, 45s or 2w."
            ) from None
    return timedelta(seconds=float(match[1]) * _UNIT_SECONDS[match[2]])
