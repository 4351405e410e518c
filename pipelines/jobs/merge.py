"""The `merge` job: a mergekit recipe -> memory plan -> merged model in a temporary folder,
renamed into place -> variant registered (store row + <home>/models/<name>.yaml), with the
job's merge config saved beside the model.

Stages: validate, plan, merge (progress: output tensors written), register.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from pipelines import events as ev
from pipelines import jobs
from pipelines.config import MergeJob
from pipelines.events import Event
from pipelines.home import MERGES
from pipelines.jobs import JobContext

MEMORY = "memory"  # error kind: the plan does not fit the device


def output_dir(cfg: MergeJob, home: Path) -> Path:
    return jobs.output_dir(cfg.output, home, MERGES, cfg.name)


def run(cfg: MergeJob, ctx: JobContext) -> Iterator[Event]:
    started = time.perf_counter()
    yield ev.start("merge", cfg.name, f"{cfg.merge.get('merge_method', '?')} merge")

    yield ev.stage("validate", "checking the mergekit configuration")
    from pipelines.merge.merge import (
        check_output,
        check_variant_name,
        register_merged,
        run_merge,
        validate_merge_config,
    )
    from pipelines.plan.budget import detect_budget
    from pipelines.plan.merge import plan_merge

    check_variant_name(cfg.name)
    config = validate_merge_config(cfg.merge, "merge")
    out = output_dir(cfg, ctx.home)
    check_output(out)

    yield ev.stage("plan", "predicting peak memory from the safetensors headers")
    plan = plan_merge(cfg.merge, cfg.options)  # paths as mergekit will read them
    plan.budget = detect_budget()
    yield from plan.events()
    if not plan.fits:
        yield ev.error(MEMORY, f"refused: {plan.verdict()}")
        return
    ctx.check_cancelled()

    yield ev.stage("merge", f"writing {out}")
    # mergekit blocks until done: run it in a thread and relay its progress as events.
    updates: queue.Queue[tuple[int, int]] = queue.Queue()
    outcome: dict[str, Any] = {}

    def work() -> None:
        try:
            run_merge(config, out, cfg.options, progress=lambda d, t: updates.put((d, t)))
        except BaseException as exc:  # re-raised in the job thread, below
            outcome["error"] = exc

    thread = threading.Thread(target=work, name="mergekit", daemon=True)
    thread.start()
    last = time.monotonic()
    while thread.is_alive() or not updates.empty():
        try:
            done, total = updates.get(timeout=0.2)
        except queue.Empty:
            ctx.check_cancelled()
            continue
        # Throttle: a large model has thousands of tensors; 5 lines a second is plenty.
        if done == total or time.monotonic() - last > 0.2:
            last = time.monotonic()
            yield ev.progress(done, total, "tensors", stage="merge")
        ctx.check_cancelled()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]

    yield ev.stage("register", f"variant {cfg.name}")
    (out / "kyara_merge.yaml").write_text(
        yaml.safe_dump(cfg.model_dump(mode="json"), allow_unicode=True, sort_keys=False),
        encoding="utf-8")
    variant_yaml = register_merged(ctx, cfg.name, out, config,
                                   f"{config.merge_method} merge from job {cfg.name}",
                                   f"merged by kyara job {cfg.name}")
    yield ev.log(f"variant {cfg.name} registered: {variant_yaml}")
    yield ev.done({
        "variant": cfg.name,
        "output": str(out),
        "variant_yaml": str(variant_yaml),
        "merge_method": config.merge_method,
        "predicted_host_bytes": plan.host_peak,
        "seconds": round(time.perf_counter() - started, 3),
    })
