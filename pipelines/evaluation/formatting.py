"""The figures of results.json as text, one way for every reader: `report.md`,
`report.html` (pipelines.evaluation.report) and the console (`kyara report`, the Reports
screen) print an interval, a difference, a p or a rate through these functions alone.

    fmt_num(x)          5.12        (signed=True: +0.31; digits=0: 41)
    fmt_mean(stat)      5.12 [4.80, 5.41]      a mean and its CI
    fmt_diff(diff)      +0.31 [-0.05, +0.66]   a paired difference: every bound signed
    fmt_p(p)            p=0.004 / p<0.001
    fmt_share(rate)     82%
    fmt_rate(rate)      82% [74, 88]           a proportion and its Wilson interval
    fmt_pairwise(pair)  win 45% [35, 55] · tie 20% [12, 31] · loss 35% [25, 46] (n=40)
    fmt_date(created)   2025-06-01 12:00 UTC+09:00

A missing figure is "—", never 0; a mean or difference without its interval (one question)
is the figure then "[—]", so a column headed "mean [95% CI]" never shows a bare number as if
it were one. Standard library only (the console imports it).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

MISSING = "—"
OUTCOMES = ("win", "tie", "loss")


def fmt_num(x: float | None, digits: int = 2, signed: bool = False) -> str:
    if x is None:
        return MISSING
    return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"


def _interval(stat: Mapping[str, Any] | None, signed: bool) -> str:
    if not stat or stat.get("mean") is None:
        return MISSING
    mean, lo, hi = stat["mean"], stat.get("lo"), stat.get("hi")
    if lo is None or hi is None:
        return f"{fmt_num(mean, signed=signed)} [{MISSING}]"
    return (f"{fmt_num(mean, signed=signed)} "
            f"[{fmt_num(lo, signed=signed)}, {fmt_num(hi, signed=signed)}]")


def fmt_mean(stat: Mapping[str, Any] | None) -> str:
    """`5.12 [4.80, 5.41]`; `5.12 [—]` without an interval; `—` when nothing was scored."""
    return _interval(stat, signed=False)


def fmt_diff(diff: Mapping[str, Any] | None) -> str:
    """`+0.31 [-0.05, +0.66]`: combo minus reference, paired over questions; each bound
    signed, so an interval that holds 0 reads as one at a glance."""
    return _interval(diff, signed=True)


def fmt_p(p: float | None, missing: str = MISSING) -> str:
    """`p=0.004`, `p<0.001`; `missing` without a p (the console's cell, which has no p
    column, says `p=—`)."""
    if p is None:
        return missing
    return "p<0.001" if p < 0.001 else f"p={p:.3f}"


def fmt_share(rate: float | None) -> str:
    """A share alone, as a whole percentage: `82%`."""
    return MISSING if rate is None else f"{rate * 100:.0f}%"


def fmt_rate(rate: Mapping[str, Any] | None) -> str:
    """`82% [74, 88]` (Wilson interval); `—` when nothing was counted (the contract writes
    null for n == 0)."""
    if not rate or not rate.get("n"):
        return MISSING
    return (f"{fmt_share(rate['rate'])} "
            f"[{rate['lo'] * 100:.0f}, {rate['hi'] * 100:.0f}]")


def fmt_pairwise(pair: Mapping[str, Any] | None) -> str:
    """`win 45% [35, 55] · tie 20% [12, 31] · loss 35% [25, 46] (n=40)`."""
    if not pair or not pair.get("n"):
        return MISSING
    parts = [f"{o} {fmt_rate(pair.get(o))}" for o in OUTCOMES]
    return " · ".join(parts) + f" (n={pair['n']})"


def fmt_date(created: str | None) -> str:
    """meta.created as `2025-06-01 12:00` and its zone, as written (not converted)."""
    if not created:
        return MISSING
    try:
        when = datetime.fromisoformat(str(created).replace("Z", "+00:00"))
    except ValueError:
        return str(created)
    return when.strftime("%Y-%m-%d %H:%M") + (f" {when.tzname()}" if when.tzinfo else "")
