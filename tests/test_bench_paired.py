"""bench/paired.py: paired comparisons of methods run on the same seeds."""

from __future__ import annotations

import math

import pytest

from bench.paired import PairedDifference, median_interval, paired_difference, t_quantile


def test_the_median_interval_covers_the_median_at_its_confidence():
    # 60 values: the order statistics 22 and 39 (1-based) bound the median at 95 %.
    values = list(range(60))
    assert median_interval(values) == (29.5, 21, 38)
    assert median_interval([3.0, 1.0, 2.0]) == (2.0, 1.0, 3.0)  # too few: the whole range


@pytest.mark.parametrize(
    ("probability", "degrees", "quantile"),
    # Student's t quantiles from the standard tables
    [(0.95, 1, 6.313752), (0.95, 2, 2.919986), (0.95, 9, 1.833113), (0.975, 20, 2.085963)],
)
def test_t_quantiles_are_students(probability, degrees, quantile):
    assert t_quantile(probability, degrees) == pytest.approx(quantile, abs=1e-6)


def test_a_paired_difference_uses_the_seeds_both_ran_and_bounds_the_mean():
    mine = {0: 2.40, 1: 2.42, 2: 2.44, 3: 2.50}  # seed 3: the other method has no run
    theirs = {0: 2.41, 1: 2.41, 2: 2.45, 4: 2.0}
    paired = paired_difference(mine, theirs)
    differences = [-0.01, 0.01, -0.01]
    half = 2.919986 * 0.011547005 / math.sqrt(3)  # t(0.95, 2) * stdev / sqrt(n)
    assert paired.count == 3
    assert paired.mean == pytest.approx(sum(differences) / 3)
    assert paired.high == pytest.approx(paired.mean + half, rel=1e-5)
    assert paired.low == pytest.approx(paired.mean - half, rel=1e-5)
    assert paired_difference({0: 1.0, 1: math.inf}, {0: 1.0, 1: 1.0}) is None  # one finite pair


@pytest.mark.parametrize(
    ("low", "high", "verdict"),
    [(-0.01, 0.02, "non-inferior"), (0.04, 0.05, "worse"), (0.0, 0.05, "undecided")],
)
def test_non_inferiority_reads_the_bounds_against_the_margin(low, high, verdict):
    assert PairedDifference(3, (low + high) / 2, low, high).verdict(0.03) == verdict
