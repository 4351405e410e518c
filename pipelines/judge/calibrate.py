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
with. Reading them back, and what they mean for the console ("calibrated", "stale",
"uncalibrated") and the curate job, is `pipelines.judge.calibration`; its names are
re-exported here.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from pipelines.config import CalibrationRow
from pipelines.judge.calibration import (  # re-exported: the stored side of a calibration
    FILE_VERSION,
    Agreement,
    CalibrationReport,
    CalibrationStatus,
    calibration_path,
    calibration_status,
    load_calibration,
    save_calibration,
)
from pipelines.judge.verdict import Interaction, JudgeError, Verdict

if TYPE_CHECKING:  # a type only (the runner does not import this module either way)
    from pipelines.judge.runner import Judge

__all__ = ["FILE_VERSION", "Agreement", "CalibrationReport", "CalibrationStatus",
           "StoredLabel", "agreement", "calibrate", "calibration_path", "calibration_rows",
           "calibration_status", "labelled_criteria", "load_calibration", "save_calibration",
           "stored_labels"]


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
        sources={"file": len(rows), "store": len(stored)}, identity=judge.identity,
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
