"""One loader for every causal LM kyara runs (pipelines.inference.loading): chat, train,
prefer, the mini-evaluation, pair sampling, before/after and evolve load Gemma with eager
attention (Gemma 2's soft-capping is only computed there), so a job's figures come from
the model chat serves."""

from __future__ import annotations

import ast
from pathlib import Path

from pipelines.config import HFVariant
from pipelines.inference.loading import attention_for, load_causal_lm
from tests.conftest import REPO

# The places that may call from_pretrained on a model class themselves, and why: they
# convert weights (no attention runs) or compare in fp32 against a converted file.
CONVERTERS = {
    "pipelines/inference/loading.py": "the loader itself",
    "pipelines/inference/dequantize.py": "GGUF -> HF folder: weights only",
    "pipelines/export/convert.py": "merge_and_unload before conversion: weights only",
    "pipelines/export/verify.py": "fp32 eager reference for the exported file",
}


def test_the_attention_rule():
    assert attention_for("gemma2") == "eager"
    assert attention_for("gemma3_text") == "eager" and attention_for("gemma") == "eager"
    assert attention_for("gemma2", "sdpa") == "sdpa"  # an explicit choice wins
    assert attention_for("llama") is None and attention_for(None) is None
    assert attention_for("llama", "eager") == "eager"


def test_gemma2_loads_eager_and_others_keep_the_default(gemma_dir, llama_dir):
    import torch

    gemma = load_causal_lm(gemma_dir, dtype=torch.float32, device="cpu")
    assert gemma.config.model_type == "gemma2"
    assert gemma.config._attn_implementation == "eager"
    llama = load_causal_lm(llama_dir, dtype=torch.float32)
    assert llama.config._attn_implementation != "eager"
    chosen = load_causal_lm(llama_dir, dtype=torch.float32, attn_implementation="eager")
    assert chosen.config._attn_implementation == "eager"  # a variant's choice wins


def test_the_chat_backend_serves_the_model_the_jobs_load(gemma_dir):
    import torch

    from pipelines.inference.hf import HFBackend

    backend = HFBackend(HFVariant(name="tiny", backend="hf", model=str(gemma_dir),
                                  device="cpu"))
    try:
        served = backend.model
        assert served.config._attn_implementation == "eager"
        job = load_causal_lm(gemma_dir, dtype=torch.float32, device="cpu")
        ids = torch.tensor([[2, 5, 9, 11, 3]])
        with torch.no_grad():
            assert torch.equal(served(ids).logits, job(ids).logits)
    finally:
        backend.close()


def _from_pretrained_on_models(path: Path) -> list[int]:
    """Lines that call <Something>ForCausalLM.from_pretrained (or AutoModel...)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    lines = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == "from_pretrained"
                and isinstance(node.func.value, ast.Name)
                and ("ForCausalLM" in node.func.value.id or node.func.value.id == "AutoModel")):
            lines.append(node.lineno)
    return lines


def test_no_other_module_loads_a_model_by_itself():
    found = {}
    for path in sorted((REPO / "pipelines").rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        if rel in CONVERTERS:
            continue
        lines = _from_pretrained_on_models(path)
        if lines:
            found[rel] = lines
    assert not found, f"load models through pipelines.inference.loading: {found}"
