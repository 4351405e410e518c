"""`kyara plan JOB.yaml`: predicted peak GPU memory and host RAM of a job, from the models'
headers (no weights loaded), against the detected device or the sizes given.

Exit status: 0 fits, 1 does not fit, 2 a configuration error."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from console.common import ConfigsOption, fail, out, safe


def plan(
    job_file: Path = typer.Argument(
        ..., help="a job YAML (merge, evolve, train, prefer or eval)"),
    gpu_mem: Optional[str] = typer.Option(None, "--gpu-mem", help="GPU budget, e.g. 24GiB"),
    ram: Optional[str] = typer.Option(None, "--ram", help="host RAM budget, e.g. 64GiB"),
    configs: Optional[Path] = ConfigsOption,
) -> None:
    """Predict whether a job fits this machine (or the sizes given) before it runs."""
    from pipelines.config import ConfigError, load_job
    from pipelines.plan import detect_budget, needs_workspace, plan_job
    from pipelines.workspace import Workspace

    try:
        cfg = load_job(job_file)
        workspace = Workspace.load(configs) if needs_workspace(cfg.job) else None
        plans = plan_job(cfg, workspace, detect_budget(gpu_mem, ram))
    except ConfigError as exc:
        fail(str(exc))
    if not plans:
        out.print("nothing to plan: the job runs no local hf model")
    for item in plans:
        for line in item.lines():
            out.print(safe(line), soft_wrap=True)
    if not all(p.fits for p in plans):
        raise typer.Exit(1)
