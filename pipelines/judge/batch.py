"""Judging a data file: reading items (dialogues or calibration format), the per-criterion
summary, and the output file (one row per item with its verdicts).

Resume is the cache's job: verdicts are in the store as they come, so a run killed half
way and started again asks only for what is missing. The output file is written whole at
the end, through a temporary file, so it is never half a file.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.config import ConfigError, iter_jsonl
from pipelines.files import write_jsonl
from pipelines.judge.verdict import Interaction, JudgeError, Verdict

OUT_FIELDS = ("status", "score", "weighted_score", "reasoning", "raw_text", "error_kind", "error",
              "judge_model", "prompt_version", "tokens", "latency_ms", "attempts", "cache_key")


@dataclass
class Item:
    interaction: Interaction
    row: dict[str, Any]  # the input line as read, written back with the verdicts

    @property
    def id(self) -> str:
        return self.interaction.id or ""


def load_items(path: str | Path) -> list[Item]:
    """Rows in dialogues format ({"id", "messages": [...]}) or calibration format
    ({"id", "question", "reply"}); a row without an id gets one from its content."""
    path = Path(path)
    items: list[Item] = []
    seen: dict[str, int] = {}
    for number, where, row in iter_jsonl(path):
        if not isinstance(row, dict):
            raise ConfigError(f"{where}: expected an object, found {type(row).__name__}")
        interaction = _interaction(row, where)
        given = row.get("id")
        if given is not None and not isinstance(given, (str, int)):
            raise ConfigError(f"{where}: id: expected a string, found {type(given).__name__}")
        item_id = str(given) if given is not None else f"item-{interaction.digest()[:12]}"
        if item_id in seen:
            if given is not None:
                raise ConfigError(f"{where}: id {item_id!r} already used on line {seen[item_id]}")
            item_id = f"{item_id}-{number}"  # the same words twice, no ids: keep both rows
        seen[item_id] = number
        items.append(Item(Interaction(interaction.messages, item_id), row))
    if not items:
        raise ConfigError(f"{path}: no items (expected JSON Lines with 'messages' or "
                          "'question' and 'reply')")
    return items


def _interaction(row: Mapping[str, Any], where: str) -> Interaction:
    if isinstance(row.get("messages"), list):
        messages = row["messages"]
        if not all(isinstance(m, dict) and isinstance(m.get("content"), str)
                   and m.get("role") in ("system", "user", "assistant") for m in messages):
            raise ConfigError(f"{where}: messages: expected objects with role "
                              "(system, user, assistant) and content")
        try:
            return Interaction.from_messages(messages)
        except JudgeError:
            raise ConfigError(f"{where}: messages: the last message must be the assistant's "
                              "reply") from None
    if isinstance(row.get("question"), str) and isinstance(row.get("reply"), str):
        return Interaction.from_pair(row["question"], row["reply"])
    raise ConfigError(f"{where}: expected 'messages' (dialogues format) or 'question' and "
                      "'reply' (calibration format)")


def verdict_record(verdict: Verdict) -> dict[str, Any]:
    data = verdict.to_dict()
    return {name: data[name] for name in OUT_FIELDS}


def write_output(path: str | Path, items: Sequence[Item], criteria: Sequence[str],
                 results: Mapping[tuple[str, str], Verdict]) -> None:
    path = Path(path)
    rows = []
    for item in items:
        row = dict(item.row)
        row["id"] = item.id
        row["verdicts"] = {c: verdict_record(results[(item.id, c)])
                           for c in criteria if (item.id, c) in results}
        rows.append(row)
    try:
        write_jsonl(path, rows)
    except OSError as exc:
        raise JudgeError(f"cannot write {path}: {exc.strerror or exc}") from None


@dataclass
class CriterionSummary:
    criterion: str
    total: int = 0
    ok: int = 0
    invalid: int = 0
    failed: int = 0
    mean: float | None = None
    weighted_mean: float | None = None
    distribution: dict[int, int] = field(default_factory=lambda: dict.fromkeys(range(1, 8), 0))
    failures: dict[str, int] = field(default_factory=dict)  # error kind -> count


def summarize(results: Mapping[tuple[str, str], Verdict], criteria: Sequence[str]
              ) -> list[CriterionSummary]:
    out = []
    for criterion in criteria:
        summary = CriterionSummary(criterion)
        scores: list[int] = []
        weighted: list[float] = []
        for (_, name), verdict in results.items():
            if name != criterion:
                continue
            summary.total += 1
            if verdict.status == "ok" and verdict.score is not None:
                summary.ok += 1
                scores.append(verdict.score)
                summary.distribution[verdict.score] += 1
                if verdict.weighted_score is not None:
                    weighted.append(verdict.weighted_score)
            elif verdict.status == "invalid":
                summary.invalid += 1
            else:
                summary.failed += 1
                kind = verdict.error_kind or "unknown"
                summary.failures[kind] = summary.failures.get(kind, 0) + 1
        summary.mean = statistics.fmean(scores) if scores else None
        summary.weighted_mean = statistics.fmean(weighted) if weighted else None
        out.append(summary)
    return out
