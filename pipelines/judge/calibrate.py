"""How far a judge agrees with the human labels: the rows of the persona's
calibration.jsonl and the labels stored from the console (the store's `labels` table, on
replies of this persona's sessions; `stored_labels`). The report counts each source.

Every labelled row is judged like any item (its anchors are drawn from the OTHER file
rows: the item is never its own anchor; a stored label is judged in its conversation) and
compared with its label: Spearman's rho over the
scored rows, exact and within-one agreement, mean absolute error, and a 7x7 confusion
table (human score by row, judge score by column). Invalid and failed verdicts are
counted, never scored.

The figures are saved as JSON in `<home>/judges/<judge>/calibration.json`, one entry per
persona and criterion, with the judge's model and the prompt version they were made
with: the console shows them next to live scores, and a judge whose prompt has changed
since is shown as "stale", one never calibrated as "uncalibrated".
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.config import CalibrationRow
from pipelines.files import write_json
from pipelines.judge.verdict import Interaction, JudgeError, Verdict

if TYPE_CHECKING:  # a type only: the runner imports this module for calibration_status
    from pipelines.judge.runner import Judge

FILE_VERSION = 1


@dataclass
class Agreement:
    n: int = 0                      # labelled rows
    scored: int = 0                 # rows with an ok verdict (the figures are over these)
    invalid: int = 0
    failed: int = 0
    spearman: float | None = None
    spearman_p: float | None = None
    spearman_weighted: float | None = None
    exact: float | None = None
    within_one: float | None = None
    mae: float | None = None
    confusion: list[list[int]] = field(default_factory=lambda: [[0] * 7 for _ in range(7)])


def _rho(x: Sequence[float], y: Sequence[float]) -> tuple[float | None, float | None]:
    if len(x) < 2:
        return None, None
    from scipy.stats import spearmanr

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # constant input: rho is undefined, not a crash
        result = spearmanr(x, y)
    rho, p = float(result.statistic), float(result.pvalue)
    return (rho if math.isfinite(rho) else None), (p if math.isfinite(p) else None)


def agreement(human: Sequence[int], verdicts: Sequence[Verdict]) -> Agreement:
    """Agreement of verdicts with human scores (same order)."""
    if len(human) != len(verdicts):
        raise ValueError("one verdict per human label")
    out = Agreement(n=len(human))
    pairs: list[tuple[int, int]] = []
    weighted: list[tuple[int, float]] = []
    for label, verdict in zip(human, verdicts, strict=True):
        if verdict.status == "ok" and verdict.score is not None:
            pairs.append((label, verdict.score))
            out.confusion[label - 1][verdict.score - 1] += 1
            if verdict.weighted_score is not None:
                weighted.append((label, verdict.weighted_score))
        elif verdict.status == "invalid":
            out.invalid += 1
        else:
            out.failed += 1
    out.scored = len(pairs)
    if pairs:
        out.exact = sum(h == j for h, j in pairs) / len(pairs)
        out.within_one = sum(abs(h - j) <= 1 for h, j in pairs) / len(pairs)
        out.mae = sum(abs(h - j) for h, j in pairs) / len(pairs)
        out.spearman, out.spearman_p = _rho([h for h, _ in pairs], [j for _, j in pairs])
    if len(weighted) == len(pairs) and weighted:
        out.spearman_weighted, _ = _rho([h for h, _ in weighted], [w for _, w in weighted])
    return out


@dataclass
class CalibrationReport:
    judge: str
    model: str
    provider: str
    persona: str
    criterion: str
    prompt_version: str
    date: str
    few_shot: int
    seed: int
    agreement: Agreement
    # labelled rows by where they came from: {"file": n, "store": m} ({} in older files)
    sources: dict[str, int] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.persona}/{self.criterion}"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CalibrationReport:
        values = dict(data)
        values["agreement"] = Agreement(**values["agreement"])
        return cls(**values)


def calibration_rows(rows: Sequence[CalibrationRow], criterion: str) -> list[CalibrationRow]:
    return [r for r in rows if r.criterion == criterion]


@dataclass
class StoredLabel:
    """A human label from the store, with the conversation it was given in."""

    row: CalibrationRow           # id = the label's id; question / reply as in the file
    interaction: Interaction      # the conversation up to the reply; id = the message id


def stored_labels(store: Any, persona: str, criterion: str) -> list[StoredLabel]:
    """The store's labels on `criterion` for replies still stored in `persona`'s sessions,
    oldest first ([] for a store without labels, or no store)."""
    if store is None:
        return []
    from pipelines.datasets import reply_contexts
    from pipelines.feedback import label_rows

    labels = label_rows(store, criterion)
    contexts = reply_contexts(store, {r["message_id"] for r in labels})
    out = []
    for label in labels:
        found = contexts.get(label["message_id"])
        if found is None or found[0].get("persona") != persona:
            continue
        _, reply, before = found
        messages = [*before, {"role": "assistant", "content": reply["content"]}]
        interaction = Interaction.from_messages(messages, id=reply["id"])
        out.append(StoredLabel(
            CalibrationRow(id=label["id"], criterion=criterion, question=interaction.question,
                           reply=reply["content"], score=label["score"],
                           reason=label["note"] or ""),
            interaction))
    return out


async def calibrate(judge: Judge, criterion: str = "personality", *, use_store: bool = True,
                    on_verdict: Callable[[Interaction, Verdict], Any] | None = None
                    ) -> tuple[CalibrationReport, list[tuple[CalibrationRow, Verdict]]]:
    """Judge every row labelled for `criterion` (calibration.jsonl, and the store's labels
    unless use_store is False) and compare. Verdicts go to the store (message_id = the
    file row's id, or the labelled reply's) and the cache, so a second calibration asks
    nothing."""
    rows = calibration_rows(judge.data.calibration, criterion)
    stored = stored_labels(judge.store, judge.persona.id, criterion) if use_store else []
    if not rows and not stored:
        raise JudgeError(f"persona {judge.persona.id}: no calibration rows labelled "
                         f"{criterion!r} in calibration.jsonl"
                         + (", and no stored labels" if use_store and judge.store else ""))
    items = [Interaction.from_pair(r.question, r.reply, id=r.id) for r in rows]
    items += list({s.interaction.id: s.interaction for s in stored}.values())
    results = await judge.score_items(items, [criterion], on_verdict=on_verdict)
    verdicts = [results[(r.id, criterion)] for r in rows]
    verdicts += [results[(s.interaction.id, criterion)] for s in stored]
    labelled = [*rows, *(s.row for s in stored)]
    c = judge.criterion(criterion)
    report = CalibrationReport(
        judge=judge.name, model=judge.model, provider=judge.config.provider,
        persona=judge.persona.id, criterion=criterion, prompt_version=c.prompt_version,
        date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        few_shot=judge.config.few_shot, seed=judge.config.seed,
        agreement=agreement([r.score for r in labelled], verdicts),
        sources={"file": len(rows), "store": len(stored)},
    )
    return report, list(zip(labelled, verdicts, strict=True))


def labelled_criteria(judge: Judge, use_store: bool = True) -> list[str]:
    """The judge's criteria that have labels: file rows, or stored labels of its persona."""
    names = []
    for name in judge.criteria:
        if calibration_rows(judge.data.calibration, name) or (
                use_store and stored_labels(judge.store, judge.persona.id, name)):
            names.append(name)
    return names


# --- the file the console reads --------------------------------------------------------


def calibration_path(home: str | Path, judge: str) -> Path:
    return Path(home) / "judges" / judge / "calibration.json"


def load_calibration(home: str | Path, judge: str) -> dict[str, CalibrationReport]:
    """Every saved report of a judge, by "persona/criterion" ({} when none or unreadable:
    a damaged file only means "uncalibrated")."""
    path = calibration_path(home, judge)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return {key: CalibrationReport.from_json(value)
                for key, value in data.get("reports", {}).items()}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return {}


def save_calibration(home: str | Path, report: CalibrationReport) -> Path:
    """Add or replace this persona/criterion's report (atomic rename)."""
    path = calibration_path(home, report.judge)
    reports = load_calibration(home, report.judge)
    reports[report.key] = report
    payload = {"version": FILE_VERSION,
               "reports": {key: value.to_json() for key, value in sorted(reports.items())}}
    return write_json(path, payload)


@dataclass
class CalibrationStatus:
    state: str                        # calibrated | stale | uncalibrated
    label: str                        # short text for the console
    report: CalibrationReport | None = None


def calibration_status(home: str | Path, judge: str, persona: str, criterion: str,
                       prompt_version: str, model: str | None = None) -> CalibrationStatus:
    report = load_calibration(home, judge).get(f"{persona}/{criterion}")
    if report is None:
        return CalibrationStatus("uncalibrated", "uncalibrated")
    if report.prompt_version != prompt_version or (model is not None and report.model != model):
        return CalibrationStatus("stale", f"calibration stale (made with {report.model}, "
                                 f"{report.prompt_version})", report)
    a = report.agreement
    rho = f"ρ {a.spearman:.2f}" if a.spearman is not None else "ρ n/a"
    within = f", ±1 {a.within_one:.0%}" if a.within_one is not None else ""
    return CalibrationStatus("calibrated", f"{rho}{within} (n={a.scored}, {report.date[:10]})",
                             report)
