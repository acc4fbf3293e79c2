"""Shared measurement helpers: interleaved repeats, medians, and baseline comparisons.

Every benchmark compares a candidate with a baseline measured in the same process run.
Repeats are interleaved (A B, B A, A B, ...) so that slow drifts of the machine's load hit
both sides alike, and each side is summarised by its median.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from typing import Any

__all__ = ["Comparison", "Stopwatch", "interleaved", "median", "stopwatch"]


def median(values: Sequence[float]) -> float:
    """Median of a non-empty sequence."""
    if not values:
        raise ValueError("median of no values")
    return float(statistics.median(values))


@dataclass
class Stopwatch:
    """Elapsed wall seconds of a ``with stopwatch()`` block (set when the block ends)."""

    seconds: float = 0.0


@contextmanager
def stopwatch() -> Iterator[Stopwatch]:
    """Time a block with ``time.perf_counter``."""
    watch = Stopwatch()
    start = time.perf_counter()
    try:
        yield watch
    finally:
        watch.seconds = time.perf_counter() - start


def interleaved(
    variants: Mapping[str, Callable[[], float | None]], repeats: int
) -> dict[str, list[float]]:
    """Run every variant ``repeats`` times, alternating their order; seconds per run.

    A variant returns the seconds it measured itself (e.g. steady-state epochs only, start-up
    excluded) or ``None``, in which case the wall time of the whole call is used. The order
    is reversed on every other repeat so that neither side always runs first (warm caches,
    a trend in the background load).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    names = list(variants)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(repeats):
        for name in names if rep % 2 == 0 else reversed(names):
            with stopwatch() as watch:
                measured = variants[name]()
            seconds[name].append(watch.seconds if measured is None else float(measured))
    return seconds


@dataclass
class Comparison:
    """One row of the results table: a candidate against a baseline of the same run.

    ``ratio`` is candidate / baseline of ``measure`` (so for a time, < 1 means the
    candidate is faster; for a throughput, > 1 does). ``goal`` is an optional bound on the
    ratio (``ratio >= goal`` when ``higher_is_better``, else ``ratio <= goal``).
    """

    benchmark: str
    measure: str
    unit: str
    candidate: str
    baseline: str
    candidate_value: float
    baseline_value: float
    higher_is_better: bool
    goal: float | None = None
    note: str = ""
    ratio: float = field(init=False)

    def __post_init__(self) -> None:
        self.ratio = (
            self.candidate_value / self.baseline_value if self.baseline_value else float("nan")
        )

    @property
    def goal_met(self) -> bool | None:
        if self.goal is None:
            return None
        return self.ratio >= self.goal if self.higher_is_better else self.ratio <= self.goal

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"goal_met": self.goal_met}

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> Comparison:
        """The comparison :meth:`to_dict` wrote (``ratio`` and ``goal_met`` recomputed)."""
        return cls(**{f.name: row[f.name] for f in fields(cls) if f.init})
