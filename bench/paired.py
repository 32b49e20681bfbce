"""Paired comparisons: the median of per-pair ratios or differences with a distribution-free
confidence interval."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence


def median_interval(
    values: Sequence[float], confidence: float = 0.95
) -> tuple[float, float, float]:
    """The median of ``values`` and a ``confidence`` interval for it from order statistics (no
    assumption on the distribution): ``(median, low, high)``. With too few values for the
    confidence, the interval is their whole range."""
    ordered = sorted(values)
    count = len(ordered)
    tail = (1.0 - confidence) / 2.0
    # the largest j with P(Binomial(count, 1/2) <= j) <= tail: the interval [x_(j), x_(n-1-j)]
    below, cumulative = 0, 0.0
    while True:
        probability = math.comb(count, below) / 2.0**count
        if cumulative + probability > tail:
            break
        cumulative += probability
        below += 1
    median = statistics.median(ordered)
    if below == 0:
        return median, ordered[0], ordered[-1]
    return median, ordered[below - 1], ordered[count - below]
