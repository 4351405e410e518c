"""Tiny random Llama models for merge tests (no hub access)."""

from __future__ import annotations

from pathlib import Path


def make_model(path: Path, seed: int, *, hidden: int = 64, layers: int = 2, vocab: int = 512,
               intermediate: int = 128, heads: int = 4, kv_heads: int = 2,
               dtype: str = "float32") -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, vocab_size=vocab,
                         intermediate_size=intermediate, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, max_position_embeddings=256,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    with torch.no_grad():  # init gives zeros/ones for norms: perturb so every tensor differs
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(path, safe_serialization=True)
    return path


def make_model_fast(path: Path, seed: int, *, hidden: int, layers: int, vocab: int,
                    intermediate: int, heads: int, kv_heads: int,
                    dtype: str = "float16") -> Path:
    """Like make_model for big shapes: random tensors written straight to safetensors, no
    module init (initialising ~300M parameters in fp32 costs more time and RAM than the
    merge under test)."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, vocab_size=vocab,
                         intermediate_size=intermediate, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, max_position_embeddings=256,
                         tie_word_embeddings=False, torch_dtype=dtype,
                         architectures=["LlamaForCausalLM"])
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlamaForCausalLM(config).state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    tensors = {k: (torch.randn(s, generator=gen) * 0.02).to(getattr(torch, dtype))
               for k, s in shapes.items()}
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(path)
    return path
