"""Small statistics of the bench: min/median/max records and a least-squares line."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

__all__ = ["GIB", "linear_fit", "stat"]

#: Bytes per GiB, for the sections' memory columns.
GIB = float(1 << 30)


def stat(values: Sequence[float]) -> dict[str, Any]:
    """``{"n", "min", "median", "max", "values"}`` of a non-empty sequence."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("stat: expected at least one value, got none")
    return {
        "n": len(vals),
        "min": min(vals),
        "median": statistics.median(vals),
        "max": max(vals),
        "values": vals,
    }


def linear_fit(xs: Sequence[float], ys: Sequence[float]) -> dict[str, float] | None:
    """Least-squares ``y = intercept + slope * x``; None with fewer than two distinct x."""
    if len(set(xs)) < 2:
        return None
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    return {"slope": slope, "intercept": my - slope * mx}
