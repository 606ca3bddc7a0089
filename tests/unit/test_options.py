"""apply_async options: what is honoured, how it is stored, what is refused."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from outbox import InvalidOptionError, UnsupportedOptionError
from outbox.enqueue.options import resolve_options

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def test_no_options_means_due_now_and_nothing_to_publish_with() -> None:
    """Without options the row is due at once and publishes with Celery's defaults."""
    resolved = resolve_options({}, NOW)
    assert NOW == resolved.available_at
    assert {} == resolved.publish


def test_countdown_delays_the_row_instead_of_the_broker() -> None:
    """countdown moves available_at and is not passed on to apply_async."""
    resolved = resolve_options({"countdown": 30}, NOW)
    assert NOW + timedelta(seconds=30) == resolved.available_at
    assert "countdown" not in resolved.publish


def test_eta_sets_available_at_and_a_past_eta_is_due_now() -> None:
    """eta becomes available_at; an eta in the past is simply due."""
    later = NOW + timedelta(hours=1)
    assert later == resolve_options({"eta": later}, NOW).available_at
    assert NOW == resolve_options({"eta": NOW - timedelta(days=1)}, NOW).available_at


def test_relative_expires_is_stored_as_an_absolute_time() -> None:
    """expires in seconds counts from the enqueue call, as with apply_async, not from publish."""
    resolved = resolve_options({"expires": 60}, NOW)
    assert (NOW + timedelta(seconds=60)).isoformat() == resolved.publish["expires"]


def test_routing_and_priority_options_are_kept() -> None:
    """queue, routing_key, priority, headers and time limits are stored for the publish."""
    options = {
        "queue": "mail",
        "routing_key": "mail.high",
        "priority": 5,
        "headers": {"tenant": "acme"},
        "time_limit": 30,
        "soft_time_limit": 20,
    }
    resolved = resolve_options(options, NOW)
    assert {**options, "time_limit": 30.0, "soft_time_limit": 20.0} == resolved.publish


@pytest.mark.parametrize("name", ["link", "serializer", "task_id", "retry_policy", "exchange"])
def test_options_the_outbox_cannot_honour_are_refused_by_name(name: str) -> None:
    """An unsupported option raises, naming it, instead of being dropped silently."""
    with pytest.raises(UnsupportedOptionError, match=repr(name)):
        resolve_options({name: "x"}, NOW)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"countdown": 1, "eta": NOW}, "pass one of them"),
        ({"countdown": -5}, "must not be negative"),
        ({"countdown": "soon"}, "number of seconds"),
        ({"countdown": float("nan")}, "number of seconds"),
        ({"eta": datetime(2026, 1, 1)}, "naive datetime"),  # noqa: DTZ001 - the bad input
        ({"eta": "tomorrow"}, "must be a datetime"),
        ({"priority": 256}, "0 to 255"),
        ({"priority": True}, "0 to 255"),
        ({"queue": ""}, "non-empty string"),
        ({"headers": {1: "x"}}, "string keys"),
    ],
)
def test_bad_option_values_raise_a_specific_error(options: dict[str, object], message: str) -> None:
    """Bad values raise InvalidOptionError saying what is expected."""
    with pytest.raises(InvalidOptionError, match=message):
        resolve_options(options, NOW)


@pytest.mark.parametrize("name", ["countdown", "expires", "time_limit"])
@pytest.mark.parametrize("value", [1e12, 10**30])
def test_absurdly_long_durations_are_an_option_error(name: str, value: float) -> None:
    """Durations that would overflow datetime raise InvalidOptionError, not OverflowError."""
    with pytest.raises(InvalidOptionError, match="over ten years"):
        resolve_options({name: value}, NOW)
