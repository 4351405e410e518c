"""Small statistics over plain numbers for the eval job's results, all through scipy:

    mean_ci(values)         -> Estimate(mean, lo, hi, n)          bootstrap CI of a mean
    paired_diff(a, b)       -> PairedEstimate(mean, lo, hi, p, n)  a minus b, item by item
    wilson(k, n)            -> Proportion(rate, lo, hi, k, n) | None
    outcome_rates(outcomes) -> {"win": P, "tie": P, "loss": P, "n": int}

Every bootstrap is seeded, so the same numbers give the same interval on every run (a
rerun of the eval job must not move its own error bars). `to_dict()` gives the JSON shapes
of results.json. Pure functions: no torch, no files.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

# scipy.stats is imported inside the functions: it takes most of a second, and everything
# that imports pipelines.evaluation (the train job, the console's results view) would pay
# for it before computing anything.

OUTCOMES = ("win", "tie", "loss")


@dataclass(frozen=True)
class Estimate:
    """A mean over n values with its bootstrap interval; all None when n == 0."""

    mean: float | None
    lo: float | None
    hi: float | None
    n: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class PairedEstimate:
    """The mean of a - b over n paired items, its bootstrap interval and the Wilcoxon
    signed-rank p value; lo, hi and p are None below two pairs, everything when n == 0."""

    mean: float | None
    lo: float | None
    hi: float | None
    p: float | None
    n: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Proportion:
    """k of n, with its Wilson score interval."""

    rate: float
    lo: float
    hi: float
    k: int
    n: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def mean_ci(values: Sequence[float], confidence: float = 0.95, n_resamples: int = 2000,
            seed: int = 0) -> Estimate:
    """The mean of `values` and its `confidence` bootstrap interval: BCa where it works,
    the percentile interval where BCa cannot be computed (two values, or a degenerate
    resample), and lo == hi == mean for one value or a constant sample (there is no spread
    to resample)."""
    data = np.asarray(list(values), dtype=float)
    n = len(data)
    if n == 0:
        return Estimate(None, None, None, 0)
    mean = float(np.mean(data))
    if n == 1 or np.all(data == data[0]):
        return Estimate(mean, mean, mean, n)
    lo, hi = _bootstrap((data,), _mean, confidence, n_resamples, seed, paired=False)
    return Estimate(mean, *_around(mean, lo, hi), n)


def paired_diff(a: Sequence[float], b: Sequence[float], confidence: float = 0.95,
                n_resamples: int = 2000, seed: int = 0) -> PairedEstimate:
    """a minus b over paired items (a[i] and b[i] measure the same item): the mean
    difference, its paired bootstrap interval and the two-sided Wilcoxon signed-rank p
    value (zero differences split between the ranks; all of them zero gives p = 1)."""
    x = np.asarray(list(a), dtype=float)
    y = np.asarray(list(b), dtype=float)
    if len(x) != len(y):
        raise ValueError(f"paired_diff: {len(x)} values against {len(y)}; pairs need both")
    n = len(x)
    if n == 0:
        return PairedEstimate(None, None, None, None, 0)
    diff = x - y
    mean = float(np.mean(diff))
    if n < 2:
        return PairedEstimate(mean, None, None, None, n)
    if np.all(diff == diff[0]):
        lo = hi = mean
    else:
        lo, hi = _around(mean, *_bootstrap((x, y), _mean_diff, confidence, n_resamples, seed,
                                           paired=True))
    if np.all(diff == 0):
        p = 1.0
    else:
        from scipy import stats

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # scipy warns on small or tied samples
            p = float(stats.wilcoxon(x, y, zero_method="zsplit").pvalue)
    return PairedEstimate(mean, lo, hi, p, n)


def wilson(k: int, n: int, confidence: float = 0.95) -> Proportion | None:
    """k successes of n with the Wilson score interval; None when n == 0 (no rate)."""
    if n == 0:
        return None
    if not 0 <= k <= n:
        raise ValueError(f"wilson: k={k} is not between 0 and n={n}")
    from scipy import stats

    ci = stats.binomtest(k, n).proportion_ci(confidence_level=confidence, method="wilson")
    return Proportion(k / n, float(ci.low), float(ci.high), k, n)


def outcome_rates(outcomes: Iterable[str | None], confidence: float = 0.95) -> dict[str, Any]:
    """Win, tie and loss rates over pairwise outcomes; None entries (a failed call) are left
    out of n. A rate is None when n == 0."""
    seen = [o for o in outcomes if o is not None]
    unknown = sorted(set(seen) - set(OUTCOMES))
    if unknown:
        raise ValueError(f"outcome_rates: unknown outcome(s) {', '.join(unknown)} "
                         f"(expected {', '.join(OUTCOMES)})")
    n = len(seen)
    rates: dict[str, Any] = {o: wilson(seen.count(o), n, confidence) for o in OUTCOMES}
    rates["n"] = n
    return rates


def rates_dict(rates: dict[str, Any]) -> dict[str, Any]:
    """`outcome_rates`' result in results.json's shape (Proportions as dicts, None kept)."""
    return {key: value.to_dict() if isinstance(value, Proportion) else value
            for key, value in rates.items()}


def _mean(x: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(x, axis=axis)


def _mean_diff(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(x - y, axis=axis)


def _bootstrap(data: tuple[np.ndarray, ...], statistic: Any, confidence: float,
               n_resamples: int, seed: int, paired: bool) -> tuple[float, float]:
    """BCa when there are three values or more and it gives a finite interval, else the
    percentile interval; a fresh generator from `seed` each time, so the same input gives
    the same interval."""
    from scipy import stats

    methods = ["BCa", "percentile"] if len(data[0]) >= 3 else ["percentile"]
    lo = hi = math.nan
    for method in methods:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a degenerate BCa warns and returns NaN: we fall back
            res = stats.bootstrap(data, statistic, n_resamples=n_resamples, paired=paired,
                                  confidence_level=confidence, method=method, vectorized=True,
                                  rng=np.random.default_rng(seed))
        lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
        if math.isfinite(lo) and math.isfinite(hi):
            break
    return lo, hi


def _around(mean: float, lo: float, hi: float) -> tuple[float, float]:
    """The interval widened to hold the sample mean: a few resamples can put the mean just
    outside a BCa interval, and an error bar that misses its own point confuses a reader.
    No finite interval at all gives lo == hi == mean."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return mean, mean
    return min(lo, mean), max(hi, mean)
