"""The arena: Bradley–Terry ratings per variant from head-to-head preferences, with
bootstrap confidence intervals, once from the human votes and once from the judge's
pairwise verdicts, and how far the two orders agree.

The model: P(i beats j) = p_i / (p_i + p_j); a tie counts half a win to each side. The
rating is log p_i, centred so the players' mean is 0: a gap of log(4) ≈ 1.386 between two
players means the first wins 80% of their games. `elo` is the same number on the chess
scale (1000 + 400·log10 p).

Fit: Newton's method on the (concave) log-likelihood in numpy, a few steps for a handful
of players (Hunter's MM algorithm, as in choix, needed thousands of iterations per
bootstrap sample once a player is nearly unbeaten; choix is not a dependency and
scipy.optimize would only add overhead here). Every player also plays
`PRIOR` virtual games of one win and one loss against a fixed anchor of rating 0, so a
player that never lost (or never won) gets a large but finite rating instead of none; with
10 real games it moves a rating by well under 1%.

Intervals: the games are resampled with replacement `samples` times (seeded) and refitted;
the 2.5 / 97.5 percentiles of each rating (after centring) bound the 95% interval.

Sources: "human" is the preferences table's human votes (variants_json names the two
sides); "judge" is the eval job's pairwise verdicts (pipelines.datasets.judge_preferences)
and any stored judge preference. A row whose sides have no names, or the same name, is not
a game.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

PRIOR = 0.01          # virtual win + loss against the anchor, per player
MAX_ITER = 100
TOL = 1e-9
SAMPLES = 1000
ELO_SCALE = 400 / math.log(10)


@dataclass(frozen=True)
class Game:
    """One preference between two players: `first` won, or a tie."""

    first: str
    second: str
    tie: bool = False


@dataclass
class Rating:
    player: str
    rating: float                 # log-strength, players' mean 0
    low: float | None             # 95% bootstrap interval
    high: float | None
    games: int
    wins: int
    ties: int

    @property
    def elo(self) -> float:
        return 1000 + ELO_SCALE * self.rating


@dataclass
class Arena:
    source: str
    ratings: list[Rating]          # best first
    games: int
    samples: int
    skipped: int = 0               # preferences that were not games (sides unnamed or equal)

    def by_player(self) -> dict[str, Rating]:
        return {r.player: r for r in self.ratings}

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "games": self.games, "samples": self.samples,
                "skipped": self.skipped,
                "ratings": [{**asdict(r), "elo": r.elo} for r in self.ratings]}


@dataclass
class Agreement:
    """How alike two arenas order the players both have."""

    players: list[str] = field(default_factory=list)
    spearman: float | None = None          # of the ratings (None under 2 players, or constant)
    concordance: float | None = None       # share of player pairs ordered alike
    pairs: int = 0


def fit(games: Sequence[Game], players: Sequence[str] | None = None,
        prior: float = PRIOR) -> dict[str, float]:
    """Bradley–Terry log-strengths (mean 0) by maximum likelihood with `prior` (MM)."""
    names = list(players) if players is not None else sorted(
        {g.first for g in games} | {g.second for g in games})
    if not names:
        return {}
    first, second, tie = _arrays(games, names)
    return dict(zip(names, _fit_arrays(first, second, tie, len(names), prior), strict=True))


def _arrays(games: Sequence[Game], names: Sequence[str]
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    index = {name: k for k, name in enumerate(names)}
    return (np.array([index[g.first] for g in games], dtype=np.intp),
            np.array([index[g.second] for g in games], dtype=np.intp),
            np.array([g.tie for g in games], dtype=bool))


def _fit_arrays(first: np.ndarray, second: np.ndarray, tie: np.ndarray, n: int,
                prior: float) -> list[float]:
    wins = np.zeros((n, n))                # wins[i, j]: i's wins over j, a tie half each
    np.add.at(wins, (first, second), np.where(tie, 0.5, 1.0))
    np.add.at(wins, (second[tie], first[tie]), 0.5)
    games = wins + wins.T
    won = wins.sum(axis=1)

    def loglik(theta: np.ndarray) -> float:
        diff = theta[:, None] - theta[None, :]
        return float((wins * -np.logaddexp(0.0, -diff)).sum()
                     - prior * (2 * np.logaddexp(0.0, theta) - theta).sum())

    theta = np.zeros(n)
    current = loglik(theta)
    for _ in range(MAX_ITER):
        sig = 1 / (1 + np.exp(-(theta[:, None] - theta[None, :])))   # P(i beats j)
        anchor = 1 / (1 + np.exp(-theta))                              # P(i beats the anchor)
        grad = won - (games * sig).sum(axis=1) + prior * (1 - 2 * anchor)
        weight = games * sig * (1 - sig)
        hess = weight - np.diag(weight.sum(axis=1) + 2 * prior * anchor * (1 - anchor))
        step = np.linalg.lstsq(hess, -grad, rcond=None)[0]  # prior 0: singular (a shift)
        scale = 1.0
        while True:  # Newton, halved until the likelihood does not fall
            trial = theta + scale * step
            value = loglik(trial)
            if value >= current - 1e-12 or scale < 1e-6:
                break
            scale /= 2
        theta, current = trial, value
        if np.max(np.abs(scale * step)) < TOL:
            break
    return [float(v) for v in theta - theta.mean()]


def rate(games: Sequence[Game], *, source: str = "human", samples: int = SAMPLES,
         seed: int = 0, skipped: int = 0, prior: float = PRIOR) -> Arena:
    """Ratings with bootstrap intervals (none when samples is 0 or there is one game)."""
    names = sorted({g.first for g in games} | {g.second for g in games})
    if not names:
        return Arena(source, [], 0, 0, skipped)
    first, second, tie = _arrays(games, names)
    point = _fit_arrays(first, second, tie, len(names), prior)
    draws = np.empty((0, len(names)))
    if samples and len(games) > 1:
        rng = np.random.default_rng(seed)
        rows = []
        for _ in range(samples):
            k = rng.integers(0, len(games), len(games))
            rows.append(_fit_arrays(first[k], second[k], tie[k], len(names), prior))
        draws = np.array(rows)
    ratings = []
    for col, name in enumerate(names):
        mine = [g for g in games if name in (g.first, g.second)]
        low = high = None
        if len(draws):
            low, high = (float(x) for x in np.percentile(draws[:, col], [2.5, 97.5]))
        ratings.append(Rating(
            player=name, rating=point[col], low=low, high=high, games=len(mine),
            wins=sum(1 for g in mine if not g.tie and g.first == name),
            ties=sum(1 for g in mine if g.tie)))
    ratings.sort(key=lambda r: (-r.rating, r.player))
    return Arena(source, ratings, len(games), samples if len(draws) else 0, skipped)


def games_from_preferences(prefs: Sequence[Mapping[str, Any]]) -> tuple[list[Game], int]:
    """(games, how many rows were not games) from preference rows (variants_json)."""
    out, skipped = [], 0
    for pref in prefs:
        try:
            sides = json.loads(pref.get("variants_json") or "{}")
        except ValueError:
            sides = {}
        chosen, rejected = sides.get("chosen"), sides.get("rejected")
        if not isinstance(chosen, str) or not isinstance(rejected, str) or chosen == rejected \
                or not chosen or not rejected:
            skipped += 1
            continue
        out.append(Game(chosen, rejected, bool(pref.get("tie"))))
    return out, skipped


def arena(store: Any, source: str = "human", *, eval_dirs: Sequence[Path] = (),
          samples: int = SAMPLES, seed: int = 0, criterion: str | None = None) -> Arena:
    """The arena of one source from the store (and, for the judge, the eval runs)."""
    from pipelines import feedback as fb
    from pipelines.datasets import judge_preferences

    if source == "human":
        prefs = fb.preference_rows(store, "human")
    elif source == "judge":
        prefs = judge_preferences(store, eval_dirs) + fb.preference_rows(store, "judge")
    else:
        raise ValueError(f"arena: source is human or judge, not {source!r}")
    if criterion is not None:
        prefs = [p for p in prefs if p.get("criterion") == criterion]
    games, skipped = games_from_preferences(prefs)
    return rate(games, source=source, samples=samples, seed=seed, skipped=skipped)


def agreement(a: Arena, b: Arena) -> Agreement:
    """Spearman's rho of the two arenas' ratings over the players both have, and the share
    of those players' pairs that both put in the same order."""
    ra, rb = a.by_player(), b.by_player()
    common = sorted(set(ra) & set(rb))
    out = Agreement(players=common)
    if len(common) < 2:
        return out
    x = [ra[name].rating for name in common]
    y = [rb[name].rating for name in common]
    alike = total = 0
    for i in range(len(common)):
        for j in range(i + 1, len(common)):
            total += 1
            alike += (x[i] - x[j]) * (y[i] - y[j]) > 0
    out.pairs, out.concordance = total, alike / total
    import warnings

    from scipy.stats import spearmanr

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # constant input: rho is undefined
        rho = float(spearmanr(x, y).statistic)
    out.spearman = rho if math.isfinite(rho) else None
    return out
