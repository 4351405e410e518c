"""GGUF export: an HF model (or base + PEFT adapter) -> GGUF with llama.cpp's own converter
-> quantised -> verified against the HF model -> registered as a `gguf` variant.

One orchestration: the `export` job (pipelines/jobs/export.py) runs these steps as its
stages, and whoever needs an export runs the job (`make ayane-adapter` does, through
pipelines/ship.py). The modules here are the steps:

    tools     llama.cpp's converters, fetched once from the llama-cpp-python sdist
    convert   staging the HF folder, HF -> GGUF, adapter -> GGUF LoRA, quantisation
    spm       a SentencePiece model rebuilt from tokenizer.json where one is missing
    verify    a GGUF against the HF model: tokeniser, greedy generation, end of turn
"""

from __future__ import annotations

from pipelines.export.convert import ExportError, check_quant_types, quant_types
from pipelines.export.verify import Verification, persona_texts, verify_gguf

__all__ = [
    "ExportError",
    "Verification",
    "check_quant_types",
    "persona_texts",
    "quant_types",
    "verify_gguf",
]
