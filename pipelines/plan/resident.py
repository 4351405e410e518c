"""What a set of loaded variants holds in memory, each shared base counted once.

The console keeps every variant it has loaded (switching keeps the others), each in a
worker process; variants on one base model (`inference.worker.shared_model_key`: the same
model, dtype, device, attention, 4-bit for hf; the same file, n_ctx, GPU layers, threads
for gguf) share one process and one copy of the base, with their adapters on it. So what
they hold is, per distinct base: its weights once, each adapter once, and one process's
runtime. Read from files only (safetensors headers, file sizes): no torch, no model loaded.

The train, merge and evolve jobs' plans measure the free memory when they start
(`plan.detect_budget`, `training.memory.detect_device`), which already sees what the
workers hold; this is the estimate before anything is loaded, for whoever needs it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.config import ConfigError
from pipelines.inference.kinds import hf_source
from pipelines.inference.sources import resolve_path
from pipelines.inference.worker import shared_model_key
from pipelines.plan.model import inspect_model
from pipelines.plan.units import CUDA_CONTEXT, RUNTIME_TORCH, TORCH_DTYPE_BYTES


@dataclass
class Resident:
    """One base model in one worker process, and the variants it serves."""

    key: tuple
    base: str                    # the model folder, hub id or .gguf file
    variants: list[str] = field(default_factory=list)
    adapters: dict[str, int] = field(default_factory=dict)  # adapter path -> bytes
    weights: int | None = None   # the base's weights in memory; None: not readable here
    runtime: int = 0             # the process itself (torch, a CUDA context)

    @property
    def total(self) -> int:
        return (self.weights or 0) + sum(self.adapters.values()) + self.runtime


def resident_models(variants: Iterable[Any], home: Path | None) -> list[Resident]:
    """The distinct bases the variants load, in first-seen order, each once, with the
    variants on it and their adapters. A variant with no local model (openai) holds none."""
    out: dict[tuple, Resident] = {}
    for variant in variants:
        key = shared_model_key(variant, home)
        if key is None:
            continue
        entry = out.get(key)
        if entry is None:
            entry = out[key] = _base(variant, key, home)
        entry.variants.append(variant.name)
        adapter = _adapter(variant, home)
        if adapter is not None:
            entry.adapters.setdefault(str(adapter), _size(adapter))
    return list(out.values())


def resident_bytes(variants: Iterable[Any], home: Path | None) -> int:
    """What the variants hold together (an estimate: weights, adapters, runtimes)."""
    return sum(r.total for r in resident_models(variants, home))


def _base(variant: Any, key: tuple, home: Path | None) -> Resident:
    if key[0] == "hf":
        _, source, dtype, device, _, four_bit, _ = key
        weights = None
        try:
            stats = inspect_model(source)
            bpp = 0.55 if four_bit else TORCH_DTYPE_BYTES.get(dtype, stats.dtype_bytes)
            weights = int(stats.params * bpp)
        except ConfigError:  # a hub id not cached, a folder not made yet
            pass
        runtime = RUNTIME_TORCH + (CUDA_CONTEXT if device == "cuda" else 0)
        return Resident(key=key, base=hf_source(variant.model, home), weights=weights,
                        runtime=runtime)
    path = Path(key[1])  # gguf: the model file
    return Resident(key=key, base=str(path), weights=_size(path) if path.is_file() else None)


def _adapter(variant: Any, home: Path | None) -> Path | None:
    value = getattr(variant, "adapter", None) or getattr(variant, "lora_path", None)
    return resolve_path(value, home).resolve() if value else None


def _size(path: Path) -> int:
    """A file's size; a PEFT folder's weight files."""
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        return sum(f.stat().st_size for f in path.glob("*.safetensors")) or sum(
            f.stat().st_size for f in path.glob("*.bin"))
    return 0
