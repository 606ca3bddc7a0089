"""The health judgement of the CDC relay's slot: invalidated, or behind for too long."""

from __future__ import annotations

import pytest

from outbox.cdc_slot import SlotState
from outbox.health import assess
from outbox.heartbeat import RelayRun
from outbox.stats import OutboxStats


def stats_with(slot: SlotState | None, cdc_seen: float | None = None) -> OutboxStats:
    relays = [RelayRun("sweep@host", "sweep", 1.0)]
    if cdc_seen is not None:
        relays.append(RelayRun("cdc@host", "cdc", cdc_seen))
    return OutboxStats(
        pending=0, due=0, dead=0, oldest_pending_age_seconds=None,
        last_relay_run_seconds_ago=1.0, relays=relays, cdc_slot=slot,
    )  # fmt: skip


IDLE = SlotState("celery_outbox", exists=True, active=False, lag_bytes=10**9)


@pytest.mark.parametrize(
    ("slot", "cdc_seen", "problem"),
    [
        (None, None, None),
        (SlotState("celery_outbox", exists=True, active=True, lag_seconds=0.0), 1.0, None),
        (IDLE, 5.0, None),
        (IDLE, 61.0, "no CDC relay has streamed from replication slot celery_outbox for 61s"),
        (IDLE, None, "has streamed from replication slot celery_outbox ever, and it keeps"),
        (
            SlotState("celery_outbox", exists=True, active=True, lag_seconds=61, lag_bytes=2048),
            1.0,
            "slot celery_outbox is 61s behind (limit 60s), keeping 2,048 bytes of WAL",
        ),
        (
            SlotState("celery_outbox", exists=True, wal_status="lost"),
            1.0,
            "slot celery_outbox is invalidated: polling publishes everything; drop it",
        ),
    ],
    ids=["no slot", "caught up", "taking over", "abandoned", "never read", "behind", "invalidated"],
)
def test_the_slot_fails_health_when_invalidated_behind_or_abandoned(
    slot: SlotState | None, cdc_seen: float | None, problem: str | None
) -> None:
    """A slot between a relay's death and its standby's take-over is fine; one nobody
    reads for longer than the lag limit keeps WAL for nothing."""
    health = assess(stats_with(slot, cdc_seen), max_lag=60)
    if problem is None:
        assert health.cdc is None
        assert health.ok
    else:
        assert health.cdc is not None
        assert problem in health.cdc
        assert "CDC SLOT" == health.headline
        assert [health.cdc] == health.problems
