"""What the device offers a job: the free GPU memory and the available host RAM, detected
or given (`kyara plan --gpu-mem --ram`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipelines.plan.units import GiB, MiB, parse_size

__all__ = ["GiB", "MiB", "Budget", "detect_budget", "has_gpu"]  # sizes with the budget


@dataclass
class Budget:
    gpu: int | None     # None: no GPU
    host: int
    source: str         # "detected" or "given"


def has_gpu(budget: Budget | None) -> bool:
    """Whether the budget names a GPU (the estimators plan for CUDA then)."""
    return budget is not None and budget.gpu is not None


def detect_budget(gpu_mem: str | int | None = None, ram: str | int | None = None) -> Budget:
    """The numbers given, else the free GPU memory (CUDA) and the available host RAM."""
    gpu: int | None = parse_size(gpu_mem) if gpu_mem is not None else None
    host: int | None = parse_size(ram) if ram is not None else None
    if gpu is None:
        try:
            import torch  # only for the detection; planning itself never needs it

            if torch.cuda.is_available():
                gpu = int(torch.cuda.mem_get_info()[0])
        except Exception:
            gpu = None
    if host is None:
        host = _available_ram()
    given = "given" if gpu_mem is not None or ram is not None else "detected"
    return Budget(gpu=gpu, host=host, source=given)


def _available_ram() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import psutil

    return int(psutil.virtual_memory().available)

