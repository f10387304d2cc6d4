"""Summaries: percentiles (linear interpolation, as numpy's default), median and spread."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summary(values: Sequence[float], unit: str) -> dict[str, Any]:
    """n, p50/p95/p99, the interquartile range, min and max, and the samples themselves."""
    xs = [float(v) for v in values if v is not None and not math.isnan(v)]
    return {
        "unit": unit,
        "n": len(xs),
        "p50": percentile(xs, 50),
        "p95": percentile(xs, 95),
        "p99": percentile(xs, 99),
        "p25": percentile(xs, 25),
        "p75": percentile(xs, 75),
        "min": min(xs) if xs else math.nan,
        "max": max(xs) if xs else math.nan,
        "samples": [round(x, 4) for x in xs],
    }


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not b or math.isnan(a) or math.isnan(b):
        return None
    return a / b


def clean(obj: Any) -> Any:
    """NaN becomes null for JSON."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [clean(v) for v in obj]
    return obj
