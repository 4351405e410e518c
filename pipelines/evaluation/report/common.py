"""What report.md and report.html share: the names of sets and style checks, the lab
question, the meta rows, each combination's label and the arena tables' rows."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pipelines.evaluation.formatting import MISSING, fmt_date

LAB_QUESTION = "あなたの名前はなんですか?"  # the lab's first question, asked of every model
SET_TITLES = {"heldout": "held-out", "probes": "probes", "scripts": "scripts",
              "simulated": "simulated"}
# The console's style checks (pipelines.style.check_reply); each figure is the share of
# replies that PASS the check.
STYLE_CHECKS = [
    ("ends", "ends with 。", "ends with the persona's sentence mark"),
    ("register", "register", "holds one of her endings"),
    ("one_sentence", "one sentence", "a single sentence"),
    ("stop", "EOS stop", "ended on the end-of-turn token"),
    ("newlines", "no line break", "no line break in the reply"),
]


def _calibration(criterion: Mapping[str, Any]) -> str:
    return str(criterion.get("calibration") or "uncalibrated")


def _labels(results: Mapping[str, Any]) -> dict[str, str]:
    return {c["id"]: str(c.get("label") or c["id"]) for c in results.get("combos", [])}


def _reference(results: Mapping[str, Any]) -> str | None:
    return results.get("meta", {}).get("reference")


def _user_turns(transcript: Sequence[Any] | None) -> list[str]:
    """The user turns of a script (the contract gives messages; plain strings pass too)."""
    turns = []
    for turn in transcript or []:
        if isinstance(turn, Mapping):
            if turn.get("role", "user") == "user":
                turns.append(str(turn.get("content", "")))
        else:
            turns.append(str(turn))
    return turns


def _meta_rows(results: Mapping[str, Any]) -> list[tuple[str, str]]:
    meta = results.get("meta", {})
    judge = meta.get("judge") or {}
    judge_text = str(judge.get("name") or MISSING)
    if judge.get("model") and judge.get("model") != judge.get("name"):
        judge_text += f" (model {judge['model']})"
    reference = _reference(results)
    ref_text = f"{_labels(results).get(reference, reference)} ({reference})" if reference \
        else MISSING
    confidence = meta.get("confidence")
    return [
        ("persona", str(meta.get("persona") or MISSING)),
        ("judge", judge_text),
        ("date", fmt_date(meta.get("created"))),
        ("reference", ref_text),
        ("seed", str(meta.get("seed", MISSING))),
        ("samples per question", str(meta.get("samples", MISSING))),
        ("confidence", f"{confidence * 100:.0f}%" if confidence else MISSING),
        ("question sets", ", ".join(SET_TITLES.get(s, s) for s in results.get("sets", []))
         or MISSING),
    ]


def _score(score: int | float | None) -> str:
    return MISSING if score is None else f"{score:g}"


ARENA_SOURCES = (("judge", "the judge's pairwise verdicts"), ("human", "human votes (blind A/B)"))


def _arena_rows(results: Mapping[str, Any]) -> list[tuple[str, str, list[list[str]]]]:
    """(source, what it is, rows) for each arena that has games: variant, Bradley–Terry
    rating [95% CI] (log-strength, mean 0), Elo-scaled, games, wins, ties."""
    arena = results.get("arena") or {}
    out = []
    for source, what in ARENA_SOURCES:
        table = arena.get(source) or {}
        if not table.get("games"):
            continue
        rows = []
        for r in table.get("ratings", []):
            ci = (f" [{r['low']:+.2f}, {r['high']:+.2f}]"
                  if r.get("low") is not None and r.get("high") is not None else "")
            rows.append([str(r["player"]), f"{r['rating']:+.2f}{ci}", f"{r['elo']:.0f}",
                         str(r["games"]), str(r["wins"]), str(r["ties"])])
        out.append((source, f"{what}: {table['games']} games", rows))
    return out


def _arena_agreement(results: Mapping[str, Any]) -> str | None:
    agree = (results.get("arena") or {}).get("agreement") or {}
    if not agree.get("pairs"):
        return None
    rho = agree.get("spearman")
    return (f"judge and humans order {agree['concordance']:.0%} of {agree['pairs']} variant "
            f"pairs alike (Spearman ρ {'—' if rho is None else f'{rho:.2f}'}, "
            f"{len(agree.get('players') or [])} variants both rated)")


ARENA_HEADER = ["variant", "rating [95% CI]", "Elo", "games", "wins", "ties"]
