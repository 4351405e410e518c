"""Sizes and the fixed costs the estimators share: bytes per dtype, the runtimes measured
here, `parse_size` ('24GiB' -> bytes) and `human` (bytes -> '1.50 GiB')."""

from __future__ import annotations

import re

from pipelines.config import ConfigError

GiB = 1024**3
MiB = 1024**2

DTYPE_BYTES: dict[str, float] = {
    "F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2,
    "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}
TORCH_DTYPE_BYTES: dict[str, float] = {
    "float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2, "float64": 8,
    "int8": 1, "uint8": 1,
}

# Measured here (Python 3.11, torch 2.13 CPU, transformers 5, mergekit 0.1.5): the RSS of a
# process that has imported mergekit and run a tiny merge. Everything else scales with the
# models.
RUNTIME_MERGE = 420 * MiB
RUNTIME_TORCH = 450 * MiB     # a job that imports torch + transformers (train, eval, evolve)
CUDA_CONTEXT = 600 * MiB      # CUDA context + cuBLAS workspace, per process
PROMPT_TOKENS = 1024          # generation: prompt budget assumed besides max_new_tokens
MERGE_CHUNK_ELEMENTS = 1024**2  # in-memory evolve merge: elements per row chunk


def parse_size(text: str | int | float) -> int:
    """'24GiB', '1GB', '500M', '5B' (mergekit's shard notation: billions of bytes) -> bytes."""
    if isinstance(text, (int, float)):
        return int(text)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?)B?\s*", str(text), re.I)
    if not match:
        raise ConfigError(f"size: expected a number with a unit such as 24GiB or 500MB, "
                          f"found {text!r}")
    number, unit, binary = float(match.group(1)), match.group(2).upper(), match.group(3)
    if str(text).strip().upper().endswith("B") and not unit and number < 1e4:
        unit = "G"  # mergekit writes "5B" for five billion bytes
    power = " KMGT".index(unit or " ")
    return int(number * (1024 if binary else 1000) ** power)


def human(n: float) -> str:
    if n >= GiB:
        return f"{n / GiB:.2f} GiB"
    return f"{n / MiB:.0f} MiB"
