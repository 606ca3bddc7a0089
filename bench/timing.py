"""Timing in the benchmark's own process: variants timed in turn, round after round.

Where a section compares variants that stand side by side (tables of different sizes,
each in a schema of its own, say), it times them in turn, round after round, each round
in a rotated order, instead of one after another: a slower moment of the machine then
hits every variant alike. The first rounds warm caches and connections and are not
counted; each run's figure is the median of its rounds.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from bench.context import Context, rotated
from bench.results import median

T = TypeVar("T")
V = TypeVar("V")

#: Rounds run before measuring: caches and connections.
WARMUP_ROUNDS = 5


@dataclass(frozen=True, slots=True)
class Rounds(Generic[V]):
    """Per quantity measured and per variant: each run's median, and each run's values."""

    medians: dict[str, dict[V, list[float]]]
    samples: dict[str, dict[V, list[list[float]]]]


def in_rounds(
    ctx: Context,
    what: str,
    variants: Sequence[V],
    rounds: int,
    measure: Callable[[V], Mapping[str, float]],
) -> Rounds[V]:
    """``rounds`` rounds per run (after the warm-up's), each calling ``measure`` once per
    variant, in a rotated order; ``measure`` returns the quantities it took (ms...)."""
    medians: dict[str, dict[V, list[float]]] = {}
    samples: dict[str, dict[V, list[list[float]]]] = {}
    for run_index in range(ctx.repeats):
        ctx.say(f"{what}: run {run_index + 1}/{ctx.repeats}")
        taken: dict[str, dict[V, list[float]]] = {}
        for round_index in range(rounds + WARMUP_ROUNDS):
            for variant in rotated(variants, round_index):
                for quantity, value in measure(variant).items():
                    if round_index >= WARMUP_ROUNDS:
                        by_variant = taken.setdefault(quantity, {v: [] for v in variants})
                        by_variant[variant].append(value)
        for quantity, by_variant in taken.items():
            for variant, values in by_variant.items():
                medians.setdefault(quantity, {v: [] for v in variants})[variant].append(
                    median(values)
                )
                samples.setdefault(quantity, {v: [] for v in variants})[variant].append(values)
    return Rounds(medians, samples)


def timed_ms(call: Callable[[], T]) -> tuple[T, float]:
    """``call()``'s value, and how long it took in milliseconds."""
    start = time.perf_counter()
    value = call()
    return value, (time.perf_counter() - start) * 1000
