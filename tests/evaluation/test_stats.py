"""The eval job's statistics against numbers worked out by hand: means, Wilson bounds from
the formula (statistics.NormalDist, not scipy), paired differences, exact Wilcoxon p
values, win/tie/loss counts; and the bootstrap's promises: it holds the mean, narrows with
more data, is flat on a constant sample and is the same on every run with a seed."""

from __future__ import annotations

import math
from statistics import NormalDist

import pytest

from pipelines.evaluation import (
    Estimate,
    PairedEstimate,
    Proportion,
    mean_ci,
    outcome_rates,
    paired_diff,
    wilson,
)

Z95 = NormalDist().inv_cdf(0.975)  # 1.959963984540054


def wilson_by_hand(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval, written out:
    centre = (p + z²/2n) / (1 + z²/n),  half = z / (1 + z²/n) · sqrt(p(1-p)/n + z²/4n²)."""
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


# -- wilson ---------------------------------------------------------------------------------

def test_wilson_matches_the_formula():
    # 3 of 10: p = 0.3, z² = 3.8415; centre = (0.3 + 0.19207) / 1.38415 = 0.35550,
    # half = 1.95996 / 1.38415 · sqrt(0.021 + 0.0096037) = 1.41600 · 0.17494 = 0.24771
    # -> [0.10779, 0.60322]
    got = wilson(3, 10)
    assert isinstance(got, Proportion) and (got.rate, got.k, got.n) == (0.3, 3, 10)
    assert (got.lo, got.hi) == pytest.approx(wilson_by_hand(3, 10), abs=1e-9)
    assert got.lo == pytest.approx(0.10779, abs=1e-5)
    assert got.hi == pytest.approx(0.60322, abs=1e-5)


def test_wilson_at_the_edges():
    # 0 of 3: the lower bound is 0 and the upper z²/(n+z²) = 3.8415 / 6.8415 = 0.56150
    none = wilson(0, 3)
    assert (none.rate, none.lo, none.k, none.n) == (0.0, pytest.approx(0.0, abs=1e-12), 0, 3)
    assert none.hi == pytest.approx(Z95**2 / (3 + Z95**2), abs=1e-9)
    # 5 of 5: mirrored
    every = wilson(5, 5)
    assert every.rate == 1.0 and every.hi == pytest.approx(1.0, abs=1e-12)
    assert every.lo == pytest.approx(5 / (5 + Z95**2), abs=1e-9)
    assert wilson(0, 0) is None
    with pytest.raises(ValueError):
        wilson(4, 3)


def test_wilson_other_confidence():
    # 90%: z = 1.64485
    z90 = NormalDist().inv_cdf(0.95)
    got = wilson(7, 20, confidence=0.90)
    assert (got.lo, got.hi) == pytest.approx(wilson_by_hand(7, 20, z90), abs=1e-9)


def test_proportion_to_dict_is_the_contract_shape():
    assert wilson(1, 4).to_dict().keys() == {"rate", "lo", "hi", "k", "n"}
    assert wilson(1, 4).to_dict()["rate"] == 0.25


# -- outcome_rates --------------------------------------------------------------------------

def test_outcome_rates_count_and_leave_out_failed_calls():
    # win, win, tie, loss, (failed), win -> n = 5: win 3/5, tie 1/5, loss 1/5
    rates = outcome_rates(["win", "win", "tie", "loss", None, "win"])
    assert rates["n"] == 5
    for outcome, k in (("win", 3), ("tie", 1), ("loss", 1)):
        got = rates[outcome]
        assert (got.k, got.n, got.rate) == (k, 5, k / 5)
        assert (got.lo, got.hi) == pytest.approx(wilson_by_hand(k, 5), abs=1e-9)


def test_outcome_rates_with_nothing_counted():
    assert outcome_rates([None, None]) == {"win": None, "tie": None, "loss": None, "n": 0}
    assert outcome_rates([]) == {"win": None, "tie": None, "loss": None, "n": 0}
    with pytest.raises(ValueError, match="draw"):
        outcome_rates(["win", "draw"])


# -- mean_ci --------------------------------------------------------------------------------

def test_mean_ci_holds_the_mean_inside_the_data():
    # (3 + 4 + 5 + 6 + 7) / 5 = 25 / 5 = 5
    est = mean_ci([3, 4, 5, 6, 7])
    assert est.mean == 5.0 and est.n == 5
    assert 3 <= est.lo < 5.0 < est.hi <= 7


def test_mean_ci_narrows_with_more_data():
    small = mean_ci([3, 4, 5, 6, 7])
    large = mean_ci([3, 4, 5, 6, 7] * 8)
    assert large.mean == small.mean == 5.0
    assert large.hi - large.lo < small.hi - small.lo


def test_mean_ci_agrees_with_the_normal_interval_on_a_large_sample():
    # 1..7 thirty times: mean 4, population sd 2 (var = (9+4+1+0+1+4+9)/7 = 4),
    # se = 2 / sqrt(210) = 0.13801 -> 4 ± 1.96 · 0.13801 = [3.7295, 4.2705]
    est = mean_ci(list(range(1, 8)) * 30)
    se = 2 / math.sqrt(210)
    assert est.mean == pytest.approx(4.0)
    assert est.lo == pytest.approx(4 - Z95 * se, abs=0.05)
    assert est.hi == pytest.approx(4 + Z95 * se, abs=0.05)


def test_mean_ci_constant_sample_and_tiny_ones():
    assert mean_ci([4, 4, 4, 4]) == Estimate(4.0, 4.0, 4.0, 4)
    assert mean_ci([6]) == Estimate(6.0, 6.0, 6.0, 1)
    assert mean_ci([]) == Estimate(None, None, None, 0)
    # two different values: (2 + 6) / 2 = 4, a real interval within [2, 6]
    two = mean_ci([2, 6])
    assert two.mean == 4.0 and 2 <= two.lo < 4 < two.hi <= 6


def test_mean_ci_is_deterministic_with_a_seed():
    values = [1, 3, 3, 4, 5, 6, 6, 7, 2, 5]
    assert mean_ci(values, seed=7) == mean_ci(values, seed=7)
    assert mean_ci(values) == mean_ci(list(values))
    assert mean_ci(values).to_dict() == {"mean": 4.2, "lo": mean_ci(values).lo,
                                         "hi": mean_ci(values).hi, "n": 10}


def test_mean_ci_wider_at_higher_confidence():
    values = [1, 3, 3, 4, 5, 6, 6, 7, 2, 5]
    narrow, wide = mean_ci(values, confidence=0.8), mean_ci(values, confidence=0.99)
    assert wide.lo < narrow.lo and narrow.hi < wide.hi


# -- paired_diff ----------------------------------------------------------------------------

def test_paired_diff_by_hand():
    # a - b = [2-1, 4-2, 6-3, 8-4, 10-5] = [1, 2, 3, 4, 5]: mean 15 / 5 = 3.
    # Wilcoxon, no ties, no zeros: exact; T+ = 15 is the largest of 2^5 = 32 sign patterns
    # (and T- = 15 the other end), so the two-sided p = 2 / 32 = 0.0625.
    est = paired_diff([2, 4, 6, 8, 10], [1, 2, 3, 4, 5])
    assert est.mean == 3.0 and est.n == 5
    assert est.p == pytest.approx(0.0625)
    assert 1 <= est.lo < 3.0 < est.hi <= 5


def test_paired_diff_sign_and_two_pairs():
    # b - a = [-1, -2]: mean -1.5; exact p = 2 / 2^2 = 0.5; the interval within [-2, -1]
    est = paired_diff([1, 2], [2, 4])
    assert est.mean == -1.5 and est.n == 2
    assert est.p == pytest.approx(0.5)
    assert -2 <= est.lo <= -1.5 <= est.hi <= -1


def test_paired_diff_all_zero_and_too_few():
    assert paired_diff([3, 5, 4], [3, 5, 4]) == PairedEstimate(0.0, 0.0, 0.0, 1.0, 3)
    assert paired_diff([6], [4]) == PairedEstimate(2.0, None, None, None, 1)
    assert paired_diff([], []) == PairedEstimate(None, None, None, None, 0)
    # a constant non-zero difference: no spread, lo == hi == mean
    flat = paired_diff([5, 6, 7], [4, 5, 6])
    assert (flat.mean, flat.lo, flat.hi) == (1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="pairs"):
        paired_diff([1, 2], [1])


def test_paired_diff_is_paired_and_deterministic():
    # the items differ a lot between themselves but b is always a + 1 or a + 2: paired, the
    # interval stays within [-2, -1] (unpaired it would span the items' spread)
    a = [1, 7, 2, 6, 3, 5]
    b = [2, 9, 3, 8, 4, 7]
    est = paired_diff(a, b, seed=3)
    assert est.mean == pytest.approx(-1.5)  # (-1 -2 -1 -2 -1 -2) / 6
    assert -2 <= est.lo < est.mean < est.hi <= -1
    assert est == paired_diff(a, b, seed=3)
    assert est.to_dict().keys() == {"mean", "lo", "hi", "p", "n"}
