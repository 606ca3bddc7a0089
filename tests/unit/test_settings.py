"""Settings are validated at construction and read from OUTBOX_* keys."""

from __future__ import annotations

import pytest

from outbox import InvalidSettingError, OutboxSettings


def test_defaults_are_valid() -> None:
    """The named defaults build without error."""
    settings = OutboxSettings()
    assert 200 == settings.batch_size
    assert 1.0 == settings.sweep_interval


def test_from_mapping_reads_prefixed_keys_and_converts_them() -> None:
    """OUTBOX_BATCH_SIZE=50 from an environment string becomes batch_size=50."""
    settings = OutboxSettings.from_mapping(
        {"OUTBOX_BATCH_SIZE": "50", "OUTBOX_SWEEP_INTERVAL": "0.5", "UNRELATED": "x"}
    )
    assert (50, 0.5) == (settings.batch_size, settings.sweep_interval)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"OUTBOX_BATCH_SIZE": "lots"}, "OUTBOX_BATCH_SIZE='lots' is not a valid int"),
        ({"OUTBOX_BATCH_SIZE": "0"}, "batch_size=0 is invalid"),
        ({"OUTBOX_SWEEP_INTERVAL": "-1"}, "sweep_interval=-1.0 is invalid"),
        ({"OUTBOX_RETRY_BACKOFF_MAX": "1"}, "at least retry_backoff"),
    ],
)
def test_invalid_values_are_refused_with_the_key_and_value(
    config: dict[str, str], message: str
) -> None:
    """A bad setting fails at start-up, naming the key and the value."""
    with pytest.raises(InvalidSettingError, match=message):
        OutboxSettings.from_mapping(config)
