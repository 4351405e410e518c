"""The eval job's estimate: one plan per hf variant (run one after another), its weights
and KV cache for generation; llama.cpp and API variants are the server's business."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipelines.config import ConfigError
from pipelines.plan.budget import Budget, has_gpu
from pipelines.plan.model import inspect_model, kv_cache
from pipelines.plan.plans import Estimator, Plan, Term
from pipelines.plan.units import CUDA_CONTEXT, PROMPT_TOKENS, RUNTIME_TORCH, TORCH_DTYPE_BYTES


def plan_generate(model_dir: str, *, name: str, device: str, max_new_tokens: int,
                  dtype: str = "auto", load_in_4bit: bool = False, batch: int = 1,
                  base_dir: Path | None = None) -> Plan:
    m = inspect_model(model_dir, base_dir)
    bpp = 0.55 if load_in_4bit else TORCH_DTYPE_BYTES.get(dtype, m.dtype_bytes)
    ctx = PROMPT_TOKENS + max_new_tokens
    plan = Plan(job=f"eval {name}", device=device)
    target = plan.gpu if device == "cuda" else plan.host
    if device == "cuda":
        plan.gpu.append(Term("CUDA context", CUDA_CONTEXT))
    target.append(Term("weights", int(m.params * bpp), f"{m.params / 1e6:.0f}M params",
                       floor=None if load_in_4bit else int(m.params * 0.55)))
    target.append(Term("KV cache", kv_cache(m, ctx, batch, 2 if bpp < 2 else bpp),
                       f"context {ctx} x batch {batch}"))
    plan.host.append(Term("runtime", RUNTIME_TORCH, "Python, torch, transformers"))
    plan.remedies = {"weights": "evaluate in 8-bit or 4-bit (load_in_4bit: true)",
                     "KV cache": "fewer max_new_tokens or a smaller batch"}
    return plan



def estimate(cfg: Any, workspace: Any, budget: Budget | None,
             base_dir: Path | None) -> list[Plan]:
    if workspace is None:
        raise ConfigError("variants: the planner needs the workspace to resolve them")
    cuda = has_gpu(budget)
    plans = []
    for name in cfg.variants:
        v = workspace.variant(name)
        if v.backend != "hf":
            continue  # llama.cpp / API variants: memory is the server's business
        device = "cuda" if (v.device == "cuda" or (v.device == "auto" and cuda)) else "cpu"
        plans.append(plan_generate(v.model, name=name, device=device,
                                   max_new_tokens=v.generation.max_new_tokens,
                                   dtype=v.dtype, load_in_4bit=v.load_in_4bit,
                                   base_dir=base_dir))
    return plans


ESTIMATOR = Estimator(kinds=("eval",), estimate=estimate)
