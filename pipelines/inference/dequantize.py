"""The packaged Gemma 3 270M GGUF, dequantised once into a Hugging Face folder that
transformers, PEFT and TRL can train.

- transformers reads the GGUF itself (`gguf_file=`, needs the `gguf` package) and
  dequantises every tensor to fp32: Q4_K_M weights become the closest fp32 values, not the
  original bf16 checkpoint, but the same numbers llama.cpp computes with.
- The GGUF carries no tokenizer.model: the tokenizer is rebuilt from the GGUF vocabulary.
  It has no chat template either, so kyara's Gemma template is set on it: the dequantised
  model, its adapters and the llama.cpp variant all render one prompt text.
- Written to a temporary folder and renamed when complete: an interrupted conversion
  never looks ready, and a finished one is never converted again (a folder that exists is
  a finished one).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from pipelines.config import ConfigError
from pipelines.files import rename
from pipelines.prompting import GEMMA_TEMPLATE

MARKER = "kyara-dequantized.json"


def dequantized_ready(target: Path) -> bool:
    return (Path(target) / MARKER).is_file()


def dequantize_gguf(source: Path, target: Path) -> Path:
    """Convert the GGUF file `source` into an HF folder at `target` (unless done already); returns target."""
    target = Path(target)
    if dequantized_ready(target):
        return target
    try:
        import gguf  # noqa: F401  (transformers needs it; say so in our words, not its)
    except ImportError:
        raise ConfigError("reading a GGUF into transformers needs the gguf package: "
                          "pip install 'gguf>=0.17'") from None
    import json

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = Path(source)
    if not source.is_file():
        raise ConfigError(f"{source}: no such GGUF file")
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    tokenizer.chat_template = GEMMA_TEMPLATE
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name,
                                                 dtype=torch.float32)
    # The loaded model still says it came from a GGUF "quantization": saved as is, every
    # later load would look for the .gguf again. It is plain fp32 weights now.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        (partial / MARKER).write_text(json.dumps({"source": str(source)}) + "\n",
                                      encoding="utf-8")
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():  # a folder without the marker: an older, unfinished attempt
            shutil.rmtree(target)
        rename(partial, target)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return target
