"""GGUF export: an HF model (or base + PEFT adapter) -> GGUF with llama.cpp's own converter
-> quantised -> verified against the HF model -> registered as a `gguf` variant.

The `export` job (pipelines/jobs/export.py) drives the steps with events. The functions
below are the same steps for callers outside a job:

    from pipelines.export import export_lora_adapter
    out, check = export_lora_adapter(adapter_dir, base_hf_dir, "ayane-lora.gguf",
                                     base_gguf=packaged_270m_gguf, home=home)
"""

from __future__ import annotations

from pipelines.export.api import export_lora_adapter, verify_export
from pipelines.export.convert import ExportError, check_quant_types, quant_types
from pipelines.export.verify import Verification, persona_texts, verify_gguf

__all__ = [
    "ExportError",
    "Verification",
    "check_quant_types",
    "export_lora_adapter",
    "persona_texts",
    "quant_types",
    "verify_export",
    "verify_gguf",
]
