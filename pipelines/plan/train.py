"""The train and prefer jobs' estimate: the job's own memory model
(pipelines/training/memory.py) on the job's data, read with the base model's tokenizer, so
`kyara plan` shows the number the job refuses on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipelines.config import ConfigError
from pipelines.plan.budget import Budget, has_gpu
from pipelines.plan.model import inspect_model
from pipelines.plan.plans import Estimator, Plan, Term
from pipelines.plan.units import RUNTIME_TORCH
from pipelines.training import memory
from pipelines.training.memory import ModelShape


def plan_train(cfg: Any, model_dir: str, base_dir: Path | None = None,
               device: str = "cuda", workspace: Any = None) -> Plan:
    """The train job's own estimate (pipelines/training/memory.py), term by term: the same
    number it refuses on. With the workspace, from the job's data as the job tokenises it;
    without, from max_seq_len (an upper bound)."""
    m = inspect_model(model_dir, base_dir)
    shape = ModelShape.from_stats(m)
    cuda = device == "cuda"
    plan = Plan(job=getattr(cfg, "job", "train"), device=device, margin=memory.MARGIN)
    if workspace is not None:
        sizes = memory.sizes_from_files(cfg, workspace, m.path)
        plan.notes.append(f"from the data: longest example {sizes.seq_len} tokens, at most "
                          f"{sizes.trained_per_example} trained")
    else:
        sizes = memory.DataSizes.bound(cfg)
        plan.notes.append(f"without the data: every example {sizes.seq_len} tokens long")
    if plan.job == "prefer":
        plan.notes.append(f"{cfg.method}: two sequences per row in every batch"
                          + ("; the reference is a frozen copy of the adapter"
                             if cfg.method in ("dpo", "kto") else ""))
    est = memory.train_estimate(cfg, shape, sizes, cuda=cuda)
    one = memory.train_estimate(cfg, shape, sizes, cuda=cuda, batch=1)
    four_bit = memory.train_estimate(cfg, shape, sizes, cuda=cuda, qlora=True)
    batch = f"batch {cfg.batch_size} x seq {sizes.seq_len}"
    target = plan.gpu if cuda else plan.host
    target.append(Term("CUDA context, allocator slack" if cuda else
                       "process (torch, tokenizer, data)", est.overhead))
    target.append(Term("weights", est.weights, ("4-bit" if cfg.qlora else "") +
                       f" {m.params / 1e6:.0f}M params",
                       floor=four_bit.weights if cuda and not cfg.qlora else None))
    target.append(Term("LoRA + AdamW state", est.adapter + est.optimizer,
                       f"{est.lora_params / 1e6:.1f}M trainable: fp32 weight, grad, m, v"))
    target.append(Term("activations", est.activations, batch, floor=one.activations))
    target.append(Term("logits", est.logits, f"vocab {m.vocab}, fp32, trained positions",
                       floor=one.logits))
    if cuda:
        plan.host.append(Term("runtime", RUNTIME_TORCH, "Python, torch, transformers, TRL"))
        plan.host.append(Term("loading copy", int(m.bytes), "weights pass through host RAM"))
    processes = getattr(cfg, "processes", 1)
    if processes > 1:
        # each process holds all of the above for its share of the batch: on CUDA one GPU
        # each (the GPU terms are per GPU), the host N runtimes; on the CPU the host N of
        # everything (the job compares one process's estimate with a 1/N share of RAM)
        plan.notes.append(f"{processes} processes: batch {cfg.batch_size // processes} each; "
                          + ("the GPU terms are per GPU" if cuda else "the host holds them all"))
        plan.host = [Term(t.name, t.bytes * processes, f"{t.note}, x{processes} processes"
                          .lstrip(", "), None if t.floor is None else t.floor * processes)
                     for t in plan.host]
    effective = cfg.grad_accum * cfg.batch_size
    plan.remedies = {
        "activations": f"batch_size 1 with grad_accum {effective}, or a shorter max_seq_len",
        "logits": f"batch_size 1 with grad_accum {effective}, or a shorter max_seq_len",
        "weights": "qlora: true (4-bit base weights)",
    }
    return plan


def estimate(cfg: Any, workspace: Any, budget: Budget | None,
             base_dir: Path | None) -> list[Plan]:
    kind = cfg.job
    if workspace is None:
        raise ConfigError(f"base: a {kind} job names a variant; the planner needs the "
                          "workspace")
    variant = workspace.variant(cfg.base)
    return [plan_train(cfg, getattr(variant, "model", ""), base_dir,
                       device="cuda" if has_gpu(budget) else "cpu", workspace=workspace)]


ESTIMATOR = Estimator(kinds=("train", "prefer"), estimate=estimate)
