"""Preference pairs without a human: N replies sampled per training prompt from the variant
being trained, each scored with the persona's style checks (`pipelines.style`, the console's
badges) and, when a judge is set, the judge's criteria (mixed by `judge_weight`), best vs
worst kept when their scores differ by at least the margin.

Every sample and its score is appended (and fsynced) to `samples.jsonl` as it is made; a
rerun reads it back and samples only what is missing. Prompts are sampled in chunks of
`batch_size // samples` prompts, each chunk seeded from the job's seed and its first
prompt's id, so a chunk resampled after a crash is the same chunk. Records carry a key (the
model and adapter, the sampling settings, the seed); records of other settings are ignored.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pipelines.config import ConfigError
from pipelines.files import append_jsonl, read_jsonl_lines, write_atomic, write_jsonl

SAMPLES = "samples.jsonl"
PAIRS = "pairs.jsonl"


def read_prompts(workspace: Any, cfg: Any) -> list[dict[str, Any]]:
    """The training prompts: {id, question} rows, or the first user turn of {messages} rows
    (default: the persona's dialogues.jsonl); each question once, the first `limit`."""
    settings = cfg.pairs
    source = (Path(settings.prompts) if settings.prompts
              else workspace.persona_dir(cfg.persona) / "dialogues.jsonl")
    try:
        lines = read_jsonl_lines(source)
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read the prompts: {exc.strerror}") from None
    seen: set[str] = set()
    out: list[dict[str, Any]] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{source}: row {number}: not JSON ({exc.msg})") from None
        question = row.get("question") if isinstance(row, dict) else None
        if question is None and isinstance(row, dict) and isinstance(row.get("messages"), list):
            question = next((m.get("content") for m in row["messages"]
                             if isinstance(m, dict) and m.get("role") == "user"), None)
        if not isinstance(question, str) or not question.strip():
            raise ConfigError(f"{source}: row {number}: expected a question or messages with a "
                              "user turn")
        if question in seen:
            continue
        seen.add(question)
        ident = str(row.get("id", f"p{number}"))
        out.append({"id": ident, "question": question,
                    "prompt": [{"role": "user", "content": question}]})
        if settings.limit is not None and len(out) >= settings.limit:
            break
    if not out:
        raise ConfigError(f"{source}: no prompts")
    return out


def sampling_key(identity: dict[str, Any], settings: Any, seed: int) -> str:
    blob = json.dumps({"model": identity, "samples": settings.samples,
                       "temperature": settings.temperature,
                       "max_new_tokens": settings.max_new_tokens, "seed": seed,
                       "batch_size": settings.batch_size}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def chunk_seed(seed: int, first_id: str) -> int:
    return int(hashlib.sha256(f"{seed}:{first_id}".encode()).hexdigest()[:8], 16)


def read_samples(path: Path, key: str) -> dict[tuple[str, int], dict[str, Any]]:
    """The samples of this key already on disk, by (prompt id, sample index); a line cut
    short by a crash is skipped."""
    found: dict[tuple[str, int], dict[str, Any]] = {}
    if not path.is_file():
        return found
    for line in read_jsonl_lines(path):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("key") == key:
            found[(record["prompt_id"], int(record["k"]))] = record
    return found


def score(text: str, stop: str, rules: Any) -> tuple[float, dict[str, bool]]:
    """A sample's style score and its checks by name: the per-reply style record
    (pipelines.style.reply_style) the badges and the figures share."""
    from pipelines.style import reply_style

    style = reply_style(text, rules, stop)
    return style.score, {c.name: c.ok for c in style.checks}


def sample(model: Any, tokenizer: Any, prompts: list[dict[str, Any]], settings: Any, *,
           seed: int, key: str, template: str, system: str | None, end_ids: dict[int, str],
           rules: Any, out: Path, cancelled: Callable[[], bool] = lambda: False,
           ) -> Iterator[tuple[int, int]]:
    """Sample what samples.jsonl lacks, appending each record; yields (prompts done, total)
    after each chunk."""
    import torch

    from pipelines.evaluation import generate

    path = out / SAMPLES
    have = read_samples(path, key)  # a line cut short by a crash: append_jsonl ends it
    per_chunk = max(1, settings.batch_size // settings.samples)
    total = len(prompts)
    for start in range(0, total, per_chunk):
        chunk = prompts[start:start + per_chunk]
        if all((p["id"], k) in have for p in chunk for k in range(settings.samples)):
            yield min(start + per_chunk, total), total
            continue
        if cancelled():
            return
        torch.manual_seed(chunk_seed(seed, chunk[0]["id"]))
        questions = [p["question"] for p in chunk for _ in range(settings.samples)]
        replies = generate(model, tokenizer, questions, template=template, system=system,
                           max_new_tokens=settings.max_new_tokens,
                           batch_size=len(questions), temperature=settings.temperature,
                           end_ids=end_ids)
        records = []
        for index, reply in enumerate(replies):
            prompt = chunk[index // settings.samples]
            value, checks = score(reply.text, reply.stop, rules)
            record = {"key": key, "prompt_id": prompt["id"], "question": prompt["question"],
                      "k": index % settings.samples, "text": reply.text.strip(),
                      "stop": reply.stop, "tokens": reply.tokens, "score": round(value, 4),
                      "checks": checks}
            have[(prompt["id"], record["k"])] = record
            records.append(record)
        append_jsonl(path, *records)
        yield min(start + per_chunk, total), total


JUDGED = "judged.jsonl"


def judge_samples(workspace: Any, store: Any, persona: str, settings: Any, key: str,
                  samples: dict[tuple[str, int], dict[str, Any]], out: Path) -> dict[str, int]:
    """Every sample scored by `settings.judge` on `settings.criteria`; each verdict is
    written to judged.jsonl (replaced whole) and folded into the sample's record as
    `judge` (the mean ok score, 1..7) and `combined`. Verdicts are cached in the store's
    judgments, so a rerun asks nothing already answered. A sample whose every verdict
    failed keeps its style score alone. Returns counts for the log."""
    import asyncio

    from pipelines.judge import Interaction, Judge

    judge = Judge.open(workspace, settings.judge, persona, criteria=settings.criteria,
                       store=store)
    items = {f"{key}-{pid}-{k}": (pid, k) for (pid, k) in samples}
    interactions = [Interaction.from_pair(samples[items[i]]["question"],
                                          samples[items[i]]["text"] or "…", id=i)
                    for i in items]

    async def score() -> dict[tuple[str, str], Any]:
        try:
            return await judge.score_items(interactions, list(settings.criteria))
        finally:
            await judge.aclose()

    verdicts = asyncio.run(score())
    lines, counts = [], {"ok": 0, "failed": 0}
    for item, (pid, k) in items.items():
        scores = []
        for criterion in settings.criteria:
            verdict = verdicts.get((item, criterion))
            ok = verdict is not None and verdict.status == "ok" and verdict.score is not None
            counts["ok" if ok else "failed"] += 1
            if ok:
                scores.append(float(verdict.score))
            lines.append(json.dumps({"key": key, "prompt_id": pid, "k": k, "criterion": criterion,
                                     "status": getattr(verdict, "status", "failed"),
                                     "score": verdict.score if ok else None},
                                    ensure_ascii=False))
        record = samples[(pid, k)]
        record["judge"] = sum(scores) / len(scores) if scores else None
        record["combined"] = combined(record, settings.judge_weight)
    write_atomic(out / JUDGED, "".join(line + "\n" for line in lines))
    return counts


def combined(record: dict[str, Any], weight: float) -> float:
    """The style score, mixed with the judge's (1..7 as 0..1) where there is one."""
    if record.get("judge") is None:
        return float(record["score"])
    return (1 - weight) * float(record["score"]) + weight * (float(record["judge"]) - 1) / 6


def make_pairs(prompts: list[dict[str, Any]], samples: dict[tuple[str, int], dict[str, Any]],
               settings: Any) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Best vs worst per prompt where the gap is at least the margin (empty replies never
    take part; ties keep the first sampled). Returns the pairs (TRL's conversational
    format, with the scores) and counts for the log."""
    pairs: list[dict[str, Any]] = []
    counts = {"prompts": len(prompts), "below_margin": 0, "too_few": 0}
    for prompt in prompts:
        found = [samples[(prompt["id"], k)] for k in range(settings.samples)
                 if (prompt["id"], k) in samples]
        found = [s for s in found if s["text"]]
        if len(found) < 2 or len({s["text"] for s in found}) < 2:
            counts["too_few"] += 1
            continue
        def value(sample: dict[str, Any]) -> float:
            return float(sample.get("combined", sample["score"]))

        best, worst = max(found, key=value), min(found, key=value)
        if value(best) - value(worst) < settings.margin or best["text"] == worst["text"]:
            counts["below_margin"] += 1
            continue
        pairs.append({"id": prompt["id"], "prompt": prompt["prompt"],
                      "chosen": [{"role": "assistant", "content": best["text"]}],
                      "rejected": [{"role": "assistant", "content": worst["text"]}],
                      "scores": {"chosen": round(value(best), 4),
                                 "rejected": round(value(worst), 4)}})
    counts["pairs"] = len(pairs)
    return pairs, counts


def write_pairs(path: Path, pairs: list[dict[str, Any]]) -> None:
    write_jsonl(path, pairs)
