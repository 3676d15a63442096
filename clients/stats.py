"""Percentiles and latency summaries for the load generator (pure, no numpy needed)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

QUANTILES = (50.0, 90.0, 99.0)


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) with linear interpolation between closest ranks,
    numpy's default method; None for no values."""
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile q={q} is outside [0, 100]")
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass(frozen=True)
class LatencySummary:
    """Seconds. `count` values; None fields when there were no values."""

    count: int
    mean: float | None
    p50: float | None
    p90: float | None
    p99: float | None
    max: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize(values: Sequence[float]) -> LatencySummary:
    if not values:
        return LatencySummary(0, None, None, None, None, None)
    xs = sorted(values)
    return LatencySummary(
        count=len(xs),
        mean=sum(xs) / len(xs),
        p50=percentile(xs, 50.0),
        p90=percentile(xs, 90.0),
        p99=percentile(xs, 99.0),
        max=xs[-1],
    )
