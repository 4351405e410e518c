"""One conversation, one prompt text: the hf tokenizer's own template, the hf backend and
the GGUF backend's Gemma template agree; a hostile template is refused."""

from __future__ import annotations

import pytest

from pipelines.config import GGUFVariant, HFVariant
from pipelines.inference.base import BackendError, GenerationOptions
from pipelines.inference.gguf import GGUFBackend
from pipelines.inference.hf import HFBackend
from pipelines.prompting import TemplateError, fold_system

CONVERSATION = [
    {"role": "system", "content": "あなたは小野寺絢音です。丁寧に話します。"},
    {"role": "user", "content": "こんにちは！"},
    {"role": "assistant", "content": "ごきげんよう、絢音ですわ。"},
    {"role": "user", "content": "好きな紅茶は？"},
]


def test_hf_tokenizer_hf_backend_and_gguf_backend_render_the_same_text(gemma_dir, gguf_backend):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gemma_dir)
    with pytest.raises(Exception, match="System role not supported"):
        tokenizer.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    reference = tokenizer.apply_chat_template(
        fold_system(CONVERSATION), tokenize=False, add_generation_prompt=True
    )
    hf = HFBackend(HFVariant(name="tiny", backend="hf", model=str(gemma_dir)))
    try:
        assert hf.render(CONVERSATION) == reference
    finally:
        hf.close()
    assert gguf_backend.render(CONVERSATION) == reference
    assert reference.startswith(
        "<bos><start_of_turn>user\nあなたは小野寺絢音です。丁寧に話します。\n\nこんにちは！"
    )
    assert reference.endswith("<start_of_turn>model\n")


HOSTILE = "{{ ''.__class__.__mro__ }}{% for m in messages %}{{ m['content'] }}{% endfor %}"


def test_a_template_reaching_for_python_internals_is_refused(embedded_gguf, tmp_path, one_line):
    (tmp_path / "hostile.jinja").write_text(HOSTILE, encoding="utf-8")
    variant = GGUFVariant(
        name="hostile", backend="gguf", path=str(embedded_gguf), chat_template="hostile.jinja"
    )
    backend = GGUFBackend(variant, tmp_path)
    try:
        with pytest.raises(TemplateError) as err:
            backend.render(CONVERSATION)
        message = one_line(str(err.value))
        assert "'hostile'" in message and "Python internals" in message
        # The console catches BackendError: the same failure is one too, from stream().
        with pytest.raises(BackendError):
            next(backend.stream(CONVERSATION, GenerationOptions(max_new_tokens=2)))
    finally:
        backend.close()


def test_hf_tokenizer_template_is_sandboxed_too(gemma_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = tmp_path / "hostile-model"
    AutoModelForCausalLM.from_pretrained(gemma_dir).save_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(gemma_dir)
    tokenizer.chat_template = HOSTILE
    tokenizer.save_pretrained(model_dir)
    backend = HFBackend(HFVariant(name="hostile-hf", backend="hf", model=str(model_dir)))
    try:
        with pytest.raises(TemplateError, match="hostile-hf"):
            backend.render(CONVERSATION)
    finally:
        backend.close()
