"""The evolve job's estimate: one resident model, candidates merged into it in place."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipelines.plan.budget import Budget
from pipelines.plan.model import inspect_model, kv_cache
from pipelines.plan.plans import Estimator, Plan, Term
from pipelines.plan.units import (
    CUDA_CONTEXT,
    MERGE_CHUNK_ELEMENTS,
    PROMPT_TOKENS,
    RUNTIME_TORCH,
    TORCH_DTYPE_BYTES,
)


def plan_evolve(cfg: Any, base_dir: Path | None = None, context: int | None = None,
                batch: int = 8) -> Plan:
    """One resident model on the device, sources memory-mapped on the host, candidates
    merged tensor by tensor into it; generation batches on that model. With `ray` and N
    `workers` each actor is a process with its own resident model: on the CPU the host
    holds N of everything but the memory-mapped sources (shared page cache); on CUDA each
    actor has a GPU of its own (the GPU terms are per GPU) and the host N runtimes."""
    refs = list(cfg.models) + ([cfg.base_model] if cfg.base_model else [])
    stats = [inspect_model(r, base_dir) for r in refs]
    first = stats[0]
    device = cfg.options.device
    bpp = TORCH_DTYPE_BYTES.get(str(cfg.options.dtype), first.dtype_bytes)
    model = int(first.params * bpp)
    ctx = context or PROMPT_TOKENS + 256
    kv = kv_cache(first, ctx, batch, bpp)
    # One output tensor at a time (pipelines/merge/inmemory.py): its inputs from every
    # model cast to fp32 and the fp32 result; ties / dare_ties also hold a stacked fp32
    # delta per model and a sign mask of the same size.
    # Merged in row chunks of at most MERGE_CHUNK_ELEMENTS; ties first ranks a whole
    # tensor's |delta| (one fp32 copy; on a GPU kthvalue's copy and a temporary too).
    inputs = len(refs)
    sparse = cfg.method in ("ties", "dare_ties")
    copies = inputs + 1 + (2 * inputs if sparse else 0)
    work = int(min(first.largest_tensor, MERGE_CHUNK_ELEMENTS) * 4 * copies
               + (first.largest_tensor * 4 * (3 if device == "cuda" else 1) if sparse else 0))
    plan = Plan(job="evolve", device=device)
    target = plan.gpu if device == "cuda" else plan.host
    if device == "cuda":
        plan.gpu.append(Term("CUDA context", CUDA_CONTEXT))
    target.append(Term("resident model", model, f"{first.params / 1e6:.0f}M params",
                       floor=int(first.params * 0.55)))
    target.append(Term("KV cache", kv, f"context {ctx} x batch {batch}", floor=kv // batch))
    target.append(Term("merge accumulator", work,
                       f"one chunk's inputs, fp32, x{copies}" + (" + ranking" if sparse else "")))
    plan.host.append(Term("runtime", RUNTIME_TORCH, "Python, torch, transformers"))
    actors = (cfg.workers or 1) if getattr(cfg, "ray", False) else 1
    if actors > 1:
        each = plan.host if device != "cuda" else [t for t in plan.host if t.name == "runtime"]
        for i, term in enumerate(plan.host):
            if term in each:
                plan.host[i] = Term(term.name, term.bytes * actors,
                                    f"{term.note}, x{actors} Ray actors".lstrip(", "),
                                    None if term.floor is None else term.floor * actors)
    plan.host.append(Term("sources (mmap)", sum(s.bytes for s in stats),
                          "file-backed: reclaimable, never copied"))
    plan.remedies = {"KV cache": "generate with batch 1",
                     "resident model": "evaluate in 8-bit or 4-bit, or use a bigger GPU",
                     "no_gpu": "or set options.device: cpu (slow)"}
    return plan


def estimate(cfg: Any, workspace: Any, budget: Budget | None,
             base_dir: Path | None) -> list[Plan]:
    return [plan_evolve(cfg, base_dir)]


ESTIMATOR = Estimator(kinds=("evolve",), estimate=estimate)
