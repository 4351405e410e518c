"""The merge job's estimate: a mergekit run, from the models' safetensors headers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipelines.config import ConfigError
from pipelines.plan.budget import Budget
from pipelines.plan.model import inspect_model
from pipelines.plan.plans import Estimator, Plan, Term
from pipelines.plan.units import (
    CUDA_CONTEXT,
    RUNTIME_MERGE,
    TORCH_DTYPE_BYTES,
    MiB,
    human,
    parse_size,
)


def merge_models(merge: dict[str, Any]) -> tuple[list[str], str | None]:
    """Every model a mergekit configuration reads (models:, slices:, base_model)."""
    refs: list[str] = []

    def add(value: Any) -> None:
        if isinstance(value, dict):
            value = value.get("model")
        if isinstance(value, str) and value not in refs:
            refs.append(value)

    for item in merge.get("models") or []:
        add(item.get("model") if isinstance(item, dict) else item)
    for sl in merge.get("slices") or []:
        for src in (sl or {}).get("sources") or []:
            add(src.get("model"))
    base = merge.get("base_model")
    if base:
        add(base)
    return refs, base if isinstance(base, str) else None


def plan_merge(merge: dict[str, Any], options: Any, base_dir: Path | None = None) -> Plan:
    """A mergekit run: sources are read through memory maps (one open shard per model, its
    touched pages counted in RSS), the writer buffers up to out_shard_size of output, and a
    few tensors are live per step (the inputs of one output tensor plus the result)."""
    refs, _ = merge_models(merge)
    if not refs:
        raise ConfigError("merge: names no models (models:, slices: or base_model:)")
    stats = [inspect_model(r, base_dir) for r in refs]
    device = getattr(options, "device", "cpu") or "cpu"
    out_dtype = merge.get("out_dtype") or getattr(options, "dtype", None) or merge.get("dtype")
    first = stats[0]
    out_bpp = TORCH_DTYPE_BYTES.get(str(out_dtype), first.dtype_bytes)
    math_bpp = TORCH_DTYPE_BYTES.get(str(merge.get("dtype")), first.dtype_bytes)
    output = int(first.params * out_bpp)
    shard = parse_size(getattr(options, "out_shard_size", "5B"))
    sources = sum(max(s.shard_bytes) for s in stats)
    largest = max(s.largest_tensor for s in stats)
    working = int(largest * math_bpp * (len(stats) + 2))
    plan = Plan(job="merge", device=device)
    plan.host.append(Term("runtime", RUNTIME_MERGE, "Python, torch, mergekit"))
    plan.host.append(Term("sources (mmap)", sources,
                          f"{len(stats)} models, the largest shard of each, memory-mapped"))
    plan.host.append(Term("output shard buffer", min(shard, output),
                          f"out_shard_size {human(shard)}, output {human(output)}",
                          floor=min(64 * MiB, output)))
    if device == "cuda":
        plan.gpu.append(Term("CUDA context", CUDA_CONTEXT))
        plan.gpu.append(Term("working tensors", working,
                             f"largest tensor x {len(stats) + 2}", floor=0))
    else:
        plan.host.append(Term("working tensors", working, f"largest tensor x {len(stats) + 2}"))
    plan.remedies = {
        "output shard buffer": lambda room: "set options.out_shard_size to "
                               f"{max(int(room * 0.9) // MiB, 64)}MiB or less",
        "sources (mmap)": "re-shard the source models into smaller files (mmap pages are "
                          "file-backed: the kernel can drop them, so this term is soft)",
        "working tensors": "merge on the CPU (options.device: cpu)" if device == "cuda"
                           else "use a machine with more RAM",
        "no_gpu": "or merge on the CPU (options.device: cpu)",
        "CUDA context": "merge on the CPU (options.device: cpu)",
    }
    return plan



def estimate(cfg: Any, workspace: Any, budget: Budget | None,
             base_dir: Path | None) -> list[Plan]:
    return [plan_merge(cfg.merge, cfg.options, base_dir)]


ESTIMATOR = Estimator(kinds=("merge",), estimate=estimate, needs_workspace=False)
