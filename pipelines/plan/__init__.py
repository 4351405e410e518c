"""Memory planner: predicted peak GPU memory and host RAM of a job, from the models'
config.json and safetensors headers only (no weights are loaded, no torch import), compared
with the device's budget.

    plans = plan_job(cfg, workspace, detect_budget())   # `kyara plan`

The shared parts: `units` (sizes, the measured runtimes), `model` (what a model folder
holds), `budget` (what the device offers), `plans` (`Term`, `Plan` and its verdict,
`Estimator`). One estimator per job kind, in a module of its own (`merge`, `evolve`,
`train` for train and prefer, `eval`), registered in `ESTIMATORS` below: a new job kind's
estimate is one module with an `ESTIMATOR` and its line here. `resident` is the estimate of
what loaded variants hold (no job; not imported here: it reads the inference kinds).
"""

from __future__ import annotations

from typing import Any

from pipelines.config import ConfigError
from pipelines.plan import eval as eval_estimator
from pipelines.plan import evolve as evolve_estimator
from pipelines.plan import merge as merge_estimator
from pipelines.plan import train as train_estimator
from pipelines.plan.budget import Budget, detect_budget, has_gpu
from pipelines.plan.eval import plan_generate
from pipelines.plan.evolve import plan_evolve
from pipelines.plan.merge import merge_models, plan_merge
from pipelines.plan.model import (
    ModelStats,
    inspect_model,
    kv_cache,
    model_shape,
    resolve_model_dir,
    safetensors_header,
)
from pipelines.plan.plans import Estimator, Plan, Term
from pipelines.plan.train import plan_train
from pipelines.plan.units import (
    CUDA_CONTEXT,
    DTYPE_BYTES,
    MERGE_CHUNK_ELEMENTS,
    PROMPT_TOKENS,
    RUNTIME_MERGE,
    RUNTIME_TORCH,
    TORCH_DTYPE_BYTES,
    GiB,
    MiB,
    human,
    parse_size,
)

# job kind -> its estimator, in the order the planner names them
ESTIMATORS: dict[str, Estimator] = {
    kind: estimator
    for estimator in (merge_estimator.ESTIMATOR, evolve_estimator.ESTIMATOR,
                      train_estimator.ESTIMATOR, eval_estimator.ESTIMATOR)
    for kind in estimator.kinds
}


def estimator_for(kind: str) -> Estimator:
    """The estimator of a job kind; a ConfigError naming the kinds it knows otherwise."""
    found = ESTIMATORS.get(kind)
    if found is None:
        *rest, last = ESTIMATORS
        raise ConfigError(f"job: the planner knows {', '.join(rest)} and {last}; "
                          f"found {kind!r}")
    return found


def needs_workspace(kind: str) -> bool:
    """Whether planning a job of this kind resolves names through the workspace (False for
    a kind with no estimator: `plan_job` refuses it without one)."""
    found = ESTIMATORS.get(kind)
    return found is not None and found.needs_workspace


def plan_job(cfg: Any, workspace: Any = None, budget: Budget | None = None) -> list[Plan]:
    """Plans for one job config (eval: one per hf variant, run one after another)."""
    base_dir = workspace.settings.home_path() if workspace is not None else None
    plans = estimator_for(cfg.job).estimate(cfg, workspace, budget, base_dir)
    for plan in plans:
        plan.budget = budget
    return plans


__all__ = [
    "CUDA_CONTEXT", "DTYPE_BYTES", "ESTIMATORS", "MERGE_CHUNK_ELEMENTS", "PROMPT_TOKENS",
    "RUNTIME_MERGE", "RUNTIME_TORCH", "TORCH_DTYPE_BYTES", "Budget", "Estimator", "GiB",
    "MiB", "ModelStats", "Plan", "Term", "detect_budget", "estimator_for", "has_gpu",
    "human", "inspect_model", "kv_cache", "merge_models", "model_shape", "needs_workspace",
    "parse_size", "plan_evolve", "plan_generate", "plan_job", "plan_merge", "plan_train",
    "resolve_model_dir", "safetensors_header",
]
