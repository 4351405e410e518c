"""The one way kyara loads a causal LM from a Hugging Face folder or hub id: the chat
backend, the train and prefer jobs, the mini-evaluation, the prefer job's pair sampling and
before/after, and evolve's resident model all call `load_causal_lm`, so a figure measured
in a job comes from the model chat serves.

- Attention: the variant's or job's `attn_implementation` when it names one; otherwise
  eager for the Gemma family. Gemma 2 soft-caps its attention logits, which only the eager
  implementation computes (transformers warns to train Gemma 2 and 3 with eager); SDPA
  and flash kernels leave the cap out and give a slightly different model.
- dtype: given by the caller (`default_dtype`: bf16 on CUDA, fp32 on the CPU, where bf16
  matmuls are slow and fp32 is exact).
- Placement: `device_map` when given (4-bit models and models loaded straight onto a GPU),
  else moved to `device` after loading.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def attention_for(model_type: str | None, wanted: str | None = None) -> str | None:
    """The attention implementation to load with: `wanted` when set, eager for Gemma
    (gemma, gemma2, gemma3, gemma3_text), else transformers' default (None)."""
    if wanted:
        return wanted
    if model_type and model_type.startswith("gemma"):
        return "eager"
    return None


def model_type_of(source: Path | str) -> str | None:
    from transformers import AutoConfig

    return getattr(AutoConfig.from_pretrained(str(source)), "model_type", None)


def default_dtype(cuda: bool) -> torch.dtype:
    return torch.bfloat16 if cuda else torch.float32


def load_causal_lm(source: Path | str, *, dtype: torch.dtype, model_type: str | None = None,
                   attn_implementation: str | None = None, device: str | None = None,
                   device_map: Any = None, quantization_config: Any = None) -> Any:
    """AutoModelForCausalLM.from_pretrained with kyara's attention rule (see the module);
    `model_type` saves reading the config again when the caller has it."""
    from transformers import AutoModelForCausalLM

    if model_type is None:
        model_type = model_type_of(source)
    kwargs: dict[str, Any] = {"dtype": dtype}
    attn = attention_for(model_type, attn_implementation)
    if attn:
        kwargs["attn_implementation"] = attn
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    if device_map is not None:
        kwargs["device_map"] = device_map
    model = AutoModelForCausalLM.from_pretrained(str(source), **kwargs)
    if device is not None and device_map is None and quantization_config is None:
        model = model.to(device)
    return model
