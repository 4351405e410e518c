"""The `curate` job: judge every training conversation on the configured criteria, keep
those at or above the threshold on all of them, and write the kept and the dropped rows
(with their scores and the judge's reasons) to separate files.

- Refuses before asking anything when the judge's calibration for a criterion is missing,
  stale, or below `min_agreement` (Spearman rho against the persona's human labels):
  dropping data on scores nobody has checked is how good rows get lost. The message says
  which criterion and how to calibrate.
- Resumable: every verdict goes to the store as it comes (the judge's cache), so a run
  stopped half way and started again asks only for what is missing.
- A verdict that failed or had no valid score drops nothing: a failure is not a low
  score. Such rows are kept and counted as `unjudged`.
- `batch: true` asks through the OpenAI Batch API (pipelines.judge.batch_api): half the
  price; batch.json in the run folder lets a restarted job re-attach to its batch.

Files (default `<home>/runs/<job name>/`): kept.jsonl (the rows as read), dropped.jsonl
(each row with `curation`: per-criterion score, status and reasoning, and `reasons`).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Generator, Iterator, Sequence
from pathlib import Path
from typing import Any

from pipelines import events as ev
from pipelines.config import ConfigError, CurateJob
from pipelines.events import Event
from pipelines.files import write_jsonl
from pipelines.home import Home
from pipelines.jobs import JobContext


def calibration_problems(home: Path, judge: Any, persona: str, criteria: Sequence[str],
                         min_agreement: float) -> list[str]:
    """One line per criterion whose calibration does not allow dropping data (the gate
    lives with the calibration status: pipelines.judge.calibration)."""
    from pipelines.judge.calibration import calibration_problems as problems

    return problems(home, judge, persona, criteria, min_agreement)


def decide(item_ids: Sequence[str], criteria: Sequence[str], results: dict[tuple[str, str], Any],
           threshold: float) -> dict[str, list[str]]:
    """item id -> reasons to drop it ([] = keep)."""
    out: dict[str, list[str]] = {}
    for item_id in item_ids:
        reasons = []
        for criterion in criteria:
            verdict = results.get((item_id, criterion))
            if verdict is not None and verdict.status == "ok" and verdict.score < threshold:
                reasons.append(f"{criterion} {verdict.score} < {threshold:g}")
        out[item_id] = reasons
    return out


def _curation(verdicts: dict[str, Any]) -> dict[str, Any]:
    return {c: {"status": v.status, "score": v.score, "weighted_score": v.weighted_score,
                "reasoning": v.reasoning if v.status != "failed" else v.error}
            for c, v in verdicts.items()}


def run(cfg: CurateJob, ctx: JobContext) -> Iterator[Event]:
    from pipelines.judge import Judge
    from pipelines.judge.batch import load_items

    yield ev.start("curate", cfg.name, f"persona {cfg.persona}, judge {cfg.judge}, "
                   f"criteria {', '.join(cfg.criteria)}, threshold {cfg.threshold:g}")
    source = source_path(cfg, ctx)
    folder = Home(ctx.home).runs / cfg.name
    for key, path in (("kept", _path(cfg.kept, folder / "kept.jsonl")),
                      ("dropped", _path(cfg.dropped, folder / "dropped.jsonl"))):
        if path.exists() and source.exists() and os.path.samefile(path, source):
            raise ConfigError(f"{key}: {path} is the source file; the source is never modified")
    items = load_items(source)
    yield ev.log(f"{len(items)} conversations in {source}")

    judge = Judge.open(ctx.workspace, cfg.judge, cfg.persona, criteria=cfg.criteria,
                       store=ctx.store)
    try:
        problems = calibration_problems(ctx.home, judge, cfg.persona, cfg.criteria,
                                        cfg.min_agreement)
        if problems:
            first = problems[0].split(":")[0]
            raise ConfigError(
                f"judge {cfg.judge} may not drop data for persona {cfg.persona}: "
                f"{'; '.join(problems)}; calibrate it against the human labels first: "
                f"kyara judge calibrate --judge {cfg.judge} --persona {cfg.persona} "
                f"--criterion {first}")
        yield from _judge_all(cfg, ctx, judge, items)
    finally:
        asyncio.run(judge.aclose())


def _judge_all(cfg: CurateJob, ctx: JobContext, judge: Any, items: list[Any]) -> Iterator[Event]:
    yield ev.stage("judge", f"{len(items)} conversations x {len(cfg.criteria)} criteria"
                   + (" through the Batch API" if cfg.batch else ""))
    yield ev.progress(0, len(items), "conversations", stage="judge")
    if cfg.batch:
        results = yield from _judge_batch(cfg, ctx, judge, items)
    else:
        results = yield from _judge_live(cfg, ctx, judge, items)
    yield from _write(cfg, ctx, items, results)


def _judge_live(cfg: CurateJob, ctx: JobContext, judge: Any, items: list[Any]
                ) -> Generator[Event, None, dict[tuple[str, str], Any]]:
    results: dict[tuple[str, str], Any] = {}
    chunk = max(1, judge.config.concurrency * 4)
    for start in range(0, len(items), chunk):
        ctx.check_cancelled()
        part = [item.interaction for item in items[start:start + chunk]]

        async def score(part: list[Any] = part) -> dict[tuple[str, str], Any]:
            try:
                return await judge.score_items(part, cfg.criteria)
            finally:
                await judge.flush()             # verdicts in the store: a re-run resumes
                await judge.provider.aclose()   # its connections belong to this loop

        results.update(asyncio.run(score()))
        yield ev.progress(min(len(items), start + chunk), len(items), "conversations",
                          stage="judge")
    return results


def _judge_batch(cfg: CurateJob, ctx: JobContext, judge: Any, items: list[Any]
                 ) -> Generator[Event, None, dict[tuple[str, str], Any]]:
    """Every verdict through one batch (batch.json in the run folder), what it did not
    answer asked live."""
    from pipelines.judge.batch_api import batch_prices, judge_batch

    pairs = [(item.interaction, c) for item in items for c in cfg.criteria]
    asks = [judge.score_ask(interaction, c) for interaction, c in pairs]
    prices, source = batch_prices(judge.config)
    if prices is not None:
        yield ev.log(f"batch: {len(asks)} requests at most, priced at {source} "
                     f"(${prices.input:g} / ${prices.output:g} per million tokens)")
    loop = asyncio.new_event_loop()
    try:
        verdicts = yield from judge_batch(
            judge, asks, Home(ctx.home).runs / cfg.name / "batch.json", loop=loop,
            poll_s=cfg.batch_poll_s, timeout_s=cfg.batch_timeout_s, stage="judge",
            check_cancelled=ctx.check_cancelled)
    finally:
        loop.run_until_complete(judge.provider.aclose())
        loop.close()
    yield ev.progress(len(items), len(items), "conversations", stage="judge")
    return {(interaction.id or "", c): v for (interaction, c), v in zip(pairs, verdicts,
                                                                      strict=True)}


def _write(cfg: CurateJob, ctx: JobContext, items: list[Any],
           results: dict[tuple[str, str], Any]) -> Iterator[Event]:
    yield ev.stage("write", "kept and dropped rows")
    ids = [item.id for item in items]
    reasons = decide(ids, cfg.criteria, results, cfg.threshold)
    kept, dropped = [], []
    under: dict[str, int] = dict.fromkeys(cfg.criteria, 0)
    unjudged = 0
    for item in items:
        verdicts = {c: results[(item.id, c)] for c in cfg.criteria if (item.id, c) in results}
        if any(v.status != "ok" for v in verdicts.values()) or len(verdicts) < len(cfg.criteria):
            unjudged += 1
        for criterion, verdict in verdicts.items():
            if verdict.status == "ok" and verdict.score < cfg.threshold:
                under[criterion] += 1
        if reasons[item.id]:
            dropped.append({**item.row, "id": item.id, "curation": _curation(verdicts),
                            "reasons": reasons[item.id]})
        else:
            kept.append(item.row)
    folder = Home(ctx.home).runs / cfg.name
    kept_path = _path(cfg.kept, folder / "kept.jsonl")
    dropped_path = _path(cfg.dropped, folder / "dropped.jsonl")
    write_jsonl(kept_path, kept)
    write_jsonl(dropped_path, dropped)
    for criterion, count in under.items():
        yield ev.metric(f"under_threshold_{criterion}", count, stage="write")
        yield ev.log(f"{criterion}: {count} of {len(items)} under {cfg.threshold:g}")
    if unjudged:
        yield ev.log(f"{unjudged} conversations have a failed or invalid verdict: kept, not "
                     "dropped (run the job again to ask for those)", level="warning")
    yield ev.done({"source": str(source_path(cfg, ctx)), "total": len(items),
                   "kept": len(kept), "dropped": len(dropped), "unjudged": unjudged,
                   "under_threshold": under, "kept_path": str(kept_path),
                   "dropped_path": str(dropped_path), "threshold": cfg.threshold})


def source_path(cfg: CurateJob, ctx: JobContext) -> Path:
    return Path(cfg.data) if cfg.data else ctx.workspace.persona_dir(cfg.persona) / "dialogues.jsonl"


def _path(value: str | None, default: Path) -> Path:
    return Path(os.path.expandvars(value)).expanduser() if value else default
