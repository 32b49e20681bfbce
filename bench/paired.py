"""Paired comparisons: the median of per-pair ratios or differences with a distribution-free
confidence interval."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


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


@dataclass(frozen=True)
class PairedDifference:
    """The mean of per-seed differences (mine - theirs) over ``count`` seeds both ran, and a
    two-sided interval at twice the one-sided level: ``high`` is a one-sided upper bound."""

    count: int
    mean: float
    low: float
    high: float

    def verdict(self, margin: float) -> str:
        """Non-inferiority at ``margin``: ``non-inferior`` when the upper bound is within it,
        ``worse`` when the lower bound is beyond it, else ``undecided`` (more seeds would tell)."""
        if self.high <= margin:
            return "non-inferior"
        if self.low > margin:
            return "worse"
        return "undecided"

    def text(self) -> str:
        return f"{self.mean:+.3f} [{self.low:+.3f}, {self.high:+.3f}], {self.count} seeds"


def paired_difference(
    mine: Mapping[int, float], theirs: Mapping[int, float], confidence: float = 0.95
) -> PairedDifference | None:
    """The per-seed differences of two methods run on the same seeds (same initialisation, same
    batches), with a one-sided ``confidence`` bound each side from Student's t; None with fewer
    than two seeds where both ended finite."""
    differences = [
        mine[seed] - theirs[seed]
        for seed in sorted(set(mine) & set(theirs))
        if math.isfinite(mine[seed]) and math.isfinite(theirs[seed])
    ]
    count = len(differences)
    if count < 2:
        return None
    mean = statistics.fmean(differences)
    half_width = t_quantile(confidence, count - 1) * statistics.stdev(differences) / count**0.5
    return PairedDifference(count, mean, mean - half_width, mean + half_width)


def t_quantile(probability: float, degrees: int) -> float:
    """The ``probability`` quantile of Student's t with ``degrees`` degrees of freedom (by
    bisection on its distribution function)."""
    low, high = 0.0, 1.0
    while student_t_cdf(high, degrees) < probability:
        high *= 2.0
    for _ in range(100):
        middle = (low + high) / 2.0
        if student_t_cdf(middle, degrees) < probability:
            low = middle
        else:
            high = middle
    return (low + high) / 2.0


def student_t_cdf(t: float, degrees: int) -> float:
    """P(T <= t) for Student's t with ``degrees`` degrees of freedom."""
    tail = 0.5 * _regularized_beta(degrees / (degrees + t * t), degrees / 2.0, 0.5)
    return 1.0 - tail if t > 0 else tail


def _regularized_beta(x: float, a: float, b: float) -> float:
    """I_x(a, b), the regularized incomplete beta function (a continued fraction, evaluated
    by Lentz's method, on the side of x where it converges fast)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1.0) / (a + b + 2.0):
        return 1.0 - _regularized_beta(1.0 - x, b, a)
    front = math.exp(
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    fraction = d
    for m in range(1, 300):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            fraction *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return front * fraction / a
