"""What a broker family gives the relay: its probe and its publisher."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from celery import Celery

from outbox.clock import Clock
from outbox.settings import OutboxSettings
from outbox.transports.probes import BrokerProbe
from outbox.transports.publishers import Publisher


@dataclass(frozen=True)
class TransportFamily:
    """One broker family, as one module of :mod:`outbox.transports` defines it: how to
    ask the broker what it holds (``probe``, which also says what it can tell of lost
    messages) and how to publish to it (``publisher``)."""

    name: str
    probe: Callable[[Celery, Clock], BrokerProbe]
    publisher: Callable[[Celery, BrokerProbe, OutboxSettings], Publisher]
