"""Tiny models for the training tests, built here once per session (nothing reaches a hub):
a byte-level BPE tokenizer trained on the persona's text, a Gemma-2-shaped and a
Llama-shaped random model, and a configs/ tree whose model variants point at them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from tests.conftest import CONFIGS
from tests.inference.conftest import GEMMA2_TEMPLATE, SPECIAL_TOKENS, _ids, _save_model, corpus

LLAMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant] {% endif %}"
)

DIALOGUES = [
    {"id": f"t{i:03d}", "messages": [
        {"role": "user", "content": q},
        {"role": "assistant", "content": a},
    ]}
    for i, (q, a) in enumerate([
        ("お名前は？", "小野寺絢音と申しますわ。"),
        ("好きな飲み物は？", "ダージリンの紅茶が大好きですの。"),
        ("犬を飼っていますか？", "ゴールデンレトリバーのレオがおりますわ。"),
        ("夢は何ですか？", "ミュージカル女優になることですわ。"),
        ("趣味は？", "観劇とお菓子作りですわ。"),
        ("苦手なものは？", "雷とクモがとても苦手ですの。"),
        ("好きな季節は？", "桜が咲く春が一番好きですわ。"),
        ("部活は？", "演劇部で部長を務めておりますわ。"),
        ("好きな色は？", "ラベンダー色と白が好きですの。"),
        ("得意科目は？", "英語と音楽が得意ですわ。"),
        ("休日は何をしますか？", "観劇やカフェ巡りをしておりますわ。"),
        ("好きな花は？", "すずらんが大好きですわ。"),
    ])
]


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=800, special_tokens=SPECIAL_TOKENS,
                                  show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        unk_token="<unk>", extra_special_tokens=["<start_of_turn>", "<end_of_turn>"])
    wrapped.chat_template = GEMMA2_TEMPLATE
    out = tmp_path_factory.mktemp("train-tokenizer")
    wrapped.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_gemma(tiny_tokenizer_dir, tmp_path_factory) -> Path:
    from transformers import Gemma2Config

    config = Gemma2Config(hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=24,
                          max_position_embeddings=256, sliding_window=128,
                          tie_word_embeddings=False, **_ids(tiny_tokenizer_dir))
    return _save_model(config, tiny_tokenizer_dir, tmp_path_factory.mktemp("train-gemma2"))


@pytest.fixture(scope="session")
def tiny_llama(tiny_tokenizer_dir, tmp_path_factory) -> Path:
    from transformers import AutoTokenizer, LlamaConfig

    config = LlamaConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=256, **_ids(tiny_tokenizer_dir))
    out = _save_model(config, tiny_tokenizer_dir, tmp_path_factory.mktemp("train-llama"))
    tok = AutoTokenizer.from_pretrained(out)
    tok.chat_template = LLAMA_TEMPLATE  # no turn terminator: EOS must end the reply
    tok.save_pretrained(out)
    return out


def write_dialogues(path: Path, rows=None) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n"
                            for r in (rows or DIALOGUES)), encoding="utf-8")
    return path


@pytest.fixture
def train_configs(tmp_path, tiny_gemma, tiny_llama) -> Path:
    """The ayane persona (12 dialogues, 3 eval questions) and variants on the tiny models."""
    root = tmp_path / "configs"
    persona = root / "personas" / "ayane"
    persona.mkdir(parents=True)
    shutil.copy(CONFIGS / "personas" / "ayane" / "persona.yaml", persona / "persona.yaml")
    write_dialogues(persona / "dialogues.jsonl")
    questions = [{"id": f"e{i}", "question": q} for i, q in
                 enumerate(["お名前は？", "好きな飲み物は？", "夢は何ですか？"])]
    (persona / "eval.jsonl").write_text(
        "".join(json.dumps(q, ensure_ascii=False) + "\n" for q in questions), encoding="utf-8")
    models = root / "models"
    models.mkdir()
    for name, path in (("tiny-gemma", tiny_gemma), ("tiny-llama", tiny_llama)):
        (models / f"{name}.yaml").write_text(yaml.safe_dump(
            {"name": name, "backend": "hf", "model": str(path), "dtype": "float32",
             "device": "cpu"}), encoding="utf-8")
    (root / "jobs").mkdir()
    return root


def train_job(**changes) -> dict:
    """A train job for the tiny models: a few steps, small batches."""
    base = {"job": "train", "name": "tiny-train", "persona": "ayane", "base": "tiny-gemma",
            "epochs": 1, "max_steps": 3, "batch_size": 4, "learning_rate": 0.001,
            "max_seq_len": 256, "eval_fraction": 0.2, "save_steps": 2, "logging_steps": 1,
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"},
            "eval_max_new_tokens": 6}
    base.update(changes)
    return base
