"""The eval job's results and report stages: verdicts.jsonl, the statistics
(pipelines.evaluation.results: results.json, with the arena), report.md / report.html,
and the done event's short headline."""

from __future__ import annotations

import time
from collections.abc import Generator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pipelines import events as ev
from pipelines.config import EvalJob
from pipelines.evaluation.arena import agreement, arena
from pipelines.evaluation.report import write_report
from pipelines.evaluation.results import build_results, write_results
from pipelines.events import Event
from pipelines.files import write_jsonl
from pipelines.jobs import JobContext
from pipelines.jobs.eval.setup import VERDICTS, Setup


def statistics(cfg: EvalJob, ctx: JobContext, setup: Setup, replies: Sequence[dict[str, Any]],
               verdicts: Sequence[dict[str, Any]]) -> Generator[Event, None, dict[str, Any]]:
    yield ev.stage("results", "means, paired differences and intervals")
    write_jsonl(setup.out / VERDICTS, verdicts)
    criteria = []
    for name in dict.fromkeys(c for s in cfg.sets for c in setup.criteria[s]):
        status = setup.judge.calibration(name)
        label = f"calibrated {status.label}" if status.state == "calibrated" else status.label
        criteria.append({"name": name, "title": setup.judge.criterion(name).title,
                         "calibration": label})
    meta = {"name": cfg.name, "persona": setup.persona.id,
            "judge": {"name": setup.judge_config.name, "model": setup.judge_config.model},
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "reference": setup.reference.id, "seed": cfg.seed, "samples": cfg.samples}
    combos = [{"id": c.id, "variant": c.variant.name, "rag": c.rag, "label": c.label}
              for c in setup.combos]
    results = build_results(meta, combos, criteria, list(replies), list(verdicts),
                            seed=cfg.seed)
    results["arena"] = _arena(ctx, setup, cfg.seed)
    write_results(results, setup.out)
    return results


def _arena(ctx: JobContext, setup: Setup, seed: int) -> dict[str, Any]:
    """Bradley–Terry ratings of the variants from this run's pairwise verdicts (the judge)
    and from every human vote in the store (blind A/B), and how alike they order them."""
    judged = arena(ctx.store, "judge", eval_dirs=[setup.out], seed=seed)
    human = arena(ctx.store, "human", seed=seed)
    return {"judge": judged.to_dict(), "human": human.to_dict(),
            "agreement": asdict(agreement(judged, human))}


def report(ctx: JobContext, setup: Setup, results: dict[str, Any]
           ) -> Generator[Event, None, tuple[Path, Path]]:
    yield ev.stage("report", str(setup.out))
    md, html = write_report(results, setup.out)
    yield ev.log(f"report: {html}")
    return md, html


def headline(results: dict[str, Any], criteria: Sequence[str]) -> list[dict[str, Any]]:
    """The done event's short form: each combination's mean per criterion."""
    out = []
    for row in results.get("headline", []):
        out.append({"combo": row["combo"], **{
            c: (row["criteria"].get(c) or {}).get("mean") for c in criteria}})
    return out
