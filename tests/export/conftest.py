"""Tiny models for the GGUF export tests, built here once per session: a SentencePiece BPE
tokenizer trained on the persona's Japanese (byte fallback, Gemma's special tokens), a
Gemma-3-shaped and a Llama-shaped causal LM with random weights, a LoRA adapter with
non-zero weights. Nothing reaches a hub.

The tokenizer is SentencePiece, not the byte-level BPE of tests/inference: llama.cpp's
converter recognises byte-level BPE tokenizers only by a hash of known pre-tokenizers, and
Gemma and Llama tokenizers are SentencePiece ones.

llama.cpp's converters: taken once from the llama-cpp-python sdist into a cache shared by
all tests and sessions (`KYARA_TEST_TOOLS`, default ~/.cache/kyara-test-tools): the first
session on a fresh machine runs `pip download` (the registry; pip's own cache after that),
later sessions use the extracted folder and reach nothing. Each test's configs point
`llama_cpp_dir` at it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

REPO = Path(__file__).resolve().parents[2]
PERSONA = REPO / "configs" / "personas" / "ayane"
SPECIALS = ["<start_of_turn>", "<end_of_turn>"]
LLAMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant] {% endif %}"
)


def corpus() -> list[str]:
    lines: list[str] = []
    for row in (PERSONA / "dialogues.jsonl").read_text(encoding="utf-8").splitlines():
        if row.strip():
            lines += [m["content"] for m in json.loads(row)["messages"]]
    for row in (PERSONA / "eval.jsonl").read_text(encoding="utf-8").splitlines():
        if row.strip():
            lines.append(json.loads(row)["question"])
    profile = yaml.safe_load((PERSONA / "persona.yaml").read_text(encoding="utf-8"))
    lines += [line for line in str(profile.get("profile", "")).splitlines() if line.strip()]
    return lines + ["Hello there, how are you today?", "I love musicals and tea."] * 10


@pytest.fixture(scope="session")
def converter_tools() -> Path:
    from pipelines.export.tools import converter_dir

    cache = Path(os.environ.get("KYARA_TEST_TOOLS", Path.home() / ".cache" / "kyara-test-tools"))
    return converter_dir(cache)


def _spm_tokenizer(out: Path, dummy_prefix: bool, tokenizer_class: str) -> Path:
    import sentencepiece as spm
    from transformers import AutoTokenizer

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()), model_prefix=str(out / "sp"), vocab_size=1600,
        model_type="bpe", byte_fallback=True, character_coverage=0.98,
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>",
        bos_piece="<bos>", unk_piece="<unk>", user_defined_symbols=SPECIALS,
        add_dummy_prefix=dummy_prefix, remove_extra_whitespaces=False,
        normalization_rule_name="identity", split_digits=True, minloglevel=2,
    )
    # Built from tokenizer.model by transformers' own SentencePiece converter.
    source = out / "source"
    source.mkdir()
    shutil.copy(out / "sp.model", source / "tokenizer.model")
    (source / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": tokenizer_class}))
    folder = out / "tokenizer"
    AutoTokenizer.from_pretrained(source).save_pretrained(folder)
    shutil.copy(out / "sp.model", folder / "tokenizer.model")
    return folder


@pytest.fixture(scope="session")
def spm_tokenizer_dir(tmp_path_factory) -> Path:
    """Gemma's way: no dummy prefix (a leading space is not added)."""
    return _spm_tokenizer(tmp_path_factory.mktemp("spm-gemma"), False, "GemmaTokenizer")


@pytest.fixture(scope="session")
def llama_tokenizer_dir(tmp_path_factory) -> Path:
    """Llama's way: a dummy prefix (text starts with U+2581), as llama.cpp assumes for it."""
    return _spm_tokenizer(tmp_path_factory.mktemp("spm-llama"), True, "LlamaTokenizer")


def _save(config, tokenizer_dir: Path, out: Path, template: str | None = None) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # clear-cut greedy choices (see tests/inference/conftest.py)
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    model.generation_config = GenerationConfig(bos_token_id=config.bos_token_id,
                                               eos_token_id=config.eos_token_id,
                                               pad_token_id=config.pad_token_id)
    model.save_pretrained(out)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    if template:
        tok.chat_template = template
    tok.save_pretrained(out)
    shutil.copy(tokenizer_dir / "tokenizer.model", out / "tokenizer.model")
    return out


def _ids(tokenizer_dir: Path) -> dict:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    return {"vocab_size": len(tok), "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}


@pytest.fixture(scope="session")
def gemma3_dir(spm_tokenizer_dir, tmp_path_factory) -> Path:
    """Gemma-3-shaped; its tokenizer carries no chat template (like the dequantised 270M):
    the export must carry kyara's Gemma template."""
    from transformers import Gemma3TextConfig

    config = Gemma3TextConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, max_position_embeddings=512, sliding_window=64,
        query_pre_attn_scalar=32, **_ids(spm_tokenizer_dir))
    return _save(config, spm_tokenizer_dir, tmp_path_factory.mktemp("gemma3-tiny"))


@pytest.fixture(scope="session")
def llama_dir(llama_tokenizer_dir, tmp_path_factory) -> Path:
    from transformers import LlamaConfig

    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=512, **_ids(llama_tokenizer_dir))
    return _save(config, llama_tokenizer_dir, tmp_path_factory.mktemp("llama-tiny"),
                 template=LLAMA_TEMPLATE)


@pytest.fixture(scope="session")
def gemma3_adapter(gemma3_dir, tmp_path_factory) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(gemma3_dir, attn_implementation="eager")
    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj", "down_proj"],
                        init_lora_weights=False)
    out = tmp_path_factory.mktemp("adapter")
    get_peft_model(base, config).save_pretrained(out)
    return out
