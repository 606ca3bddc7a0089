"""Figures as the sections report them: the value of every run, its median, and a target."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

#: The unit of a ratio, as printed.
RATIO = "×"  # noqa: RUF001 - the multiplication sign is meant


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100), interpolated between the closest ranks."""
    if not values:
        return math.nan
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def ratios(numerators: Sequence[float], denominators: Sequence[float]) -> list[float]:
    """Per-run ratios of two interleaved series: each run's pair shared the same moment."""
    return [n / d if d else math.nan for n, d in zip(numerators, denominators, strict=True)]


def differences(minuends: Sequence[float], subtrahends: Sequence[float]) -> list[float]:
    """Per-run differences of two interleaved series (what one variant adds to another)."""
    return [m - s for m, s in zip(minuends, subtrahends, strict=True)]


@dataclass(frozen=True, slots=True)
class Target:
    """What the issue asks of a figure, e.g. ``<= 0.8``, checked against its median."""

    text: str
    check: Callable[[float], bool]

    @classmethod
    def at_most(cls, limit: float, unit: str = "") -> Target:
        return cls(f"≤ {limit:g}{unit}", lambda value: value <= limit)

    @classmethod
    def at_least(cls, limit: float, unit: str = "") -> Target:
        return cls(f"≥ {limit:g}{unit}", lambda value: value >= limit)


@dataclass(slots=True)
class Figure:
    """One reported number: every run's value, summarised by the median."""

    section: str
    name: str
    unit: str
    runs: list[float]
    target: Target | None = None
    note: str = ""
    #: Raw samples behind the runs (per-request times, latencies...), for the JSON file.
    samples: list[list[float]] = field(default_factory=list)

    @property
    def median(self) -> float:
        return median(self.runs)

    @property
    def met(self) -> bool | None:
        if self.target is None or math.isnan(self.median):
            return None
        return self.target.check(self.median)

    def as_dict(self) -> dict[str, Any]:
        return {
            "section": self.section,
            "name": self.name,
            "unit": self.unit,
            "median": self.median,
            "runs": self.runs,
            "target": self.target.text if self.target else None,
            "met": self.met,
            "note": self.note,
            "samples": self.samples,
        }
