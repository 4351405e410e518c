"""The `evolve` job: an evolutionary merge (CMA-ES over mergekit parameters) whose
candidates are merged in memory into one resident model and scored by the persona judge.

`run` is the list of its stages, each a function of its own:

    validate        validate     models, questions and the search space; the search folder
    check_plan      plan         refuses when the memory plan does not fit
    evolve          load         the resident model (or one per Ray actor), once
                    evaluate     progress: evaluations; metrics fitness, best_fitness,
                                 judge_<criterion>
    write_best      write        best_merge.yaml
    _materialize    materialize  with materialize: true, the merge made and registered
                    register

The search lives in its folder (`output`, default <home>/evolve/<name>):

    search.json          what makes it this search (a rerun with other settings is refused)
    evaluations.jsonl    one line per finished evaluation: genome, merge config, fitness,
                         per-criterion means, sample replies
    best_merge.yaml      the best configuration, plain mergekit YAML
    best-model/          with materialize: true, the merged model (registered as a variant)

A run killed half way (SIGKILL included) is resumed by running the job again: the stored
evaluations are replayed into CMA-ES, only the missing ones are computed. The folder is
per search, not per run, because a run directory is never reused (the runner refuses one
that already holds events).
"""

from __future__ import annotations

import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines import events as ev
from pipelines import jobs
from pipelines.config import EvolveJob
from pipelines.events import Event
from pipelines.files import write_atomic
from pipelines.home import EVOLVE
from pipelines.jobs import JobContext

MEMORY = "memory"  # error kind: the plan does not fit the device
NO_RESULT = "no_result"  # every evaluation failed


def search_dir(cfg: EvolveJob, home: Path) -> Path:
    return jobs.output_dir(cfg.output, home, EVOLVE, cfg.name)


def run(cfg: EvolveJob, ctx: JobContext) -> Iterator[Event]:
    started = time.perf_counter()
    yield ev.start("evolve", cfg.name, f"{cfg.method} evolve over {len(cfg.models)} models")
    setup = yield from validate(cfg, ctx)
    if not (yield from check_plan(cfg, ctx)):
        return
    ctx.check_cancelled()
    result = yield from evolve(cfg, ctx, setup)
    best = result.best
    if best is None:
        yield ev.error(NO_RESULT, f"every evaluation failed (see {setup.log.path}); the judge "
                                  "gave no usable verdicts")
        return
    config, text = yield from write_best(cfg, ctx, setup.folder, result)
    summary = {
        "best_fitness": best["fitness"],
        "best_index": best["index"],
        "best_merge": str(setup.folder / setup.best_file),
        "evaluations": len(result.records),
        "evaluated": result.evaluated,
        "replayed": result.replayed,
        "failed": sum(r["status"] != "ok" for r in result.records),
        "search_dir": str(setup.folder),
        "seconds": round(time.perf_counter() - started, 3),
    }
    if cfg.materialize:
        yield from _materialize(cfg, ctx, config, text, setup.folder, summary)
    yield ev.done(summary)


@dataclass
class Setup:
    """What validation hands on: the search space over the resolved models, the search
    folder and its evaluation log."""

    space: Any       # pipelines.merge.evolve.SearchSpace
    out_dtype: str
    folder: Path
    log: Any         # pipelines.merge.evolve.EvaluationLog
    best_file: str   # pipelines.merge.evolve.BEST_FILE


def validate(cfg: EvolveJob, ctx: JobContext) -> Generator[Event, None, Setup]:
    """Models, questions and the search space checked before any model is loaded; a
    rerun of the same folder with other settings is refused."""
    yield ev.stage("validate", "checking models, questions and the search space")
    from pipelines.merge.evolve import (
        BEST_FILE,
        EvaluationLog,
        SearchSpace,
        fingerprint,
        resolve_sources,
        stored_dtype,
    )
    from pipelines.merge.merge import check_variant_name, validate_merge_config

    check_variant_name(cfg.name)
    if cfg.ray:
        from pipelines.merge.evolve_ray import require_ray

        require_ray()  # before any model is touched: a missing extra is one line
    base, inputs = resolve_sources(cfg, ctx.home)
    from pipelines.merge.inmemory import SourceIndex, check_compatible

    check_compatible({f: SourceIndex(f) for f in ([base] if base else []) + inputs})
    out_dtype = cfg.options.dtype or stored_dtype(base or inputs[0])
    space = SearchSpace.build(cfg, base, inputs, out_dtype)
    validate_merge_config(space.decode(space.x0), "merge")  # the space makes valid configs
    folder = search_dir(cfg, ctx.home)
    log = EvaluationLog(folder)
    log.check_search(fingerprint(cfg, space))
    yield ev.log(f"search folder {folder}; {len(space.variables)} parameters, "
                 f"{cfg.population} x {cfg.generations} evaluations")
    return Setup(space, out_dtype, folder, log, BEST_FILE)


def check_plan(cfg: EvolveJob, ctx: JobContext) -> Generator[Event, None, bool]:
    """Peak memory predicted from the safetensors headers against this device; an error
    event and False when it does not fit."""
    from pipelines.plan.budget import detect_budget
    from pipelines.plan.evolve import plan_evolve

    yield ev.stage("plan", "predicting peak memory from the safetensors headers")
    plan = plan_evolve(cfg, ctx.home, context=None, batch=cfg.batch_size)
    plan.budget = detect_budget()
    yield from plan.events()
    if not plan.fits:
        yield ev.error(MEMORY, f"refused: {plan.verdict()}")
        return False
    return True


def evolve(cfg: EvolveJob, ctx: JobContext, setup: Setup) -> Generator[Event, None, Any]:
    """The resident model (or a pool of Ray actors) loaded once, then the CMA-ES search,
    stored evaluations replayed first; returns the SearchResult. The model is closed
    however the search ends."""
    from pipelines.merge.evolve import SearchResult, search, sequential

    where = "on Ray actors, each its own" if cfg.ray else "one"
    yield ev.stage("load", f"{where} resident model on {cfg.options.device} "
                           f"({setup.out_dtype})")
    pool = evaluator = None
    result = SearchResult([], 0, 0)
    try:
        if cfg.ray:
            from pipelines.merge.evolve_ray import RayPool

            pool = RayPool(cfg, str(ctx.workspace.configs), setup.space)
            yield ev.log(f"Ray: {pool.size} actor(s) at {pool.address}, "
                         f"{pool.info[0]['questions']} held-out question(s) each")
            evaluate = pool.evaluate
        else:
            from pipelines.merge.evolve import Evaluator

            evaluator = Evaluator(cfg, ctx.workspace, setup.space)
            yield ev.log(f"{len(evaluator.questions)} held-out question(s)"
                         + (f", {len(evaluator.capability)} capability question(s)"
                            if evaluator.capability else ""))
            evaluate = sequential(evaluator)
        ctx.check_cancelled()
        yield from search(cfg, setup.space, setup.log, evaluate, result, ctx.check_cancelled)
        if pool is not None:
            yield from _ray_report(pool)
    finally:
        if evaluator is not None:
            evaluator.close()
        if pool is not None:
            pool.close()
    return result


def _ray_report(pool: Any) -> Iterator[Event]:
    """How the evaluations were shared out, and each actor lost on the way."""
    for index, why in pool.replaced:
        yield ev.log(f"Ray: the actor evaluating {index} died ({why}); evaluation {index} "
                     "was run again on a replacement", level="warning")
    yield ev.log(f"Ray: evaluations per actor {pool.counts}")


def write_best(cfg: EvolveJob, ctx: JobContext, folder: Path,
               result: Any) -> Generator[Event, None, tuple[Any, str]]:
    """The best configuration as plain mergekit YAML, in the search folder and the run's;
    returns it (validated) and its text."""
    from pipelines.merge.evolve import BEST_FILE
    from pipelines.merge.merge import validate_merge_config

    best = result.best
    yield ev.stage("write", BEST_FILE)
    config = validate_merge_config(best["merge"], "merge")
    text = config.to_yaml()
    header = (f"# best of {len(result.records)} evaluations of evolve job {cfg.name}: "
              f"evaluation {best['index']}, fitness {best['fitness']:.6f}\n")
    for place in (folder, ctx.run_dir):
        Path(place).mkdir(parents=True, exist_ok=True)
        write_atomic(Path(place) / BEST_FILE, header + text)
    return config, text


def _materialize(cfg: EvolveJob, ctx: JobContext, config, text: str, folder: Path,
                 summary: dict) -> Iterator[Event]:
    from pipelines.config import MergeOptions
    from pipelines.merge.merge import register_merged, run_merge

    out = folder / "best-model"
    yield ev.stage("materialize", f"mergekit merge of the best config into {out}")
    done_before = out / "mergekit_config.yml"
    if done_before.is_file() and done_before.read_text(encoding="utf-8") == text:
        yield ev.log(f"{out} already holds this configuration's merge")
    else:
        # mergekit on the CPU: the resident model may still hold the GPU in this process
        run_merge(config, out, MergeOptions(**{**cfg.options.model_dump(), "device": "cpu"}))
    yield ev.stage("register", f"variant {cfg.name}")
    variant_yaml = register_merged(ctx, cfg.name, out, config,
                                   f"evolved {cfg.method} merge, job {cfg.name}",
                                   f"evolved by kyara job {cfg.name}")
    yield ev.log(f"variant {cfg.name} registered: {variant_yaml}")
    summary.update({"variant": cfg.name, "output": str(out), "variant_yaml": str(variant_yaml)})


