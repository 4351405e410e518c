"""Persona prompts, system folding and the sandboxed template renderer."""

import pytest

from pipelines.config import KnowledgeFact
from pipelines.prompting import (
    GEMMA_TEMPLATE,
    TemplateError,
    build_messages,
    fold_system,
    format_context,
    render_chat,
    render_prompt,
    supports_system,
    system_prompt,
)
from pipelines.workspace import Workspace
from tests.conftest import CONFIGS

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def persona():
    return Workspace.load(CONFIGS).persona("ayane")


def test_system_prompts_with_and_without_retrieval(persona):
    assert system_prompt(persona) == persona.prompts.system
    facts = [KnowledgeFact(id="k1", topic="pets", text="絢音の愛犬はレオである。"),
             KnowledgeFact(id="k2", topic="x", text="波括弧 {name} もそのまま。")]
    with_rag = system_prompt(persona, format_context(facts))
    assert with_rag.startswith(persona.prompts.system)
    assert with_rag.endswith("- 絢音の愛犬はレオである。\n- 波括弧 {name} もそのまま。")
    assert "{context}" not in with_rag


def test_fold_system_into_first_user_turn():
    msgs = build_messages("SYS", [{"role": "user", "content": "a"},
                                  {"role": "assistant", "content": "b"}], "c")
    folded = fold_system(msgs)
    assert [m["role"] for m in folded] == ["user", "assistant", "user"]
    assert folded[0]["content"] == "SYS\n\na"
    assert msgs[0]["role"] == "system"  # the input is not modified
    assert fold_system([{"role": "user", "content": "x"}]) == [{"role": "user", "content": "x"}]


def test_gemma_template_folds_and_chatml_keeps_system():
    msgs = build_messages("SYS", [], "こんにちは")
    assert not supports_system(GEMMA_TEMPLATE)
    assert supports_system(CHATML)
    gemma = render_prompt("gemma", msgs, bos_token="<bos>")
    assert gemma == "<bos><start_of_turn>user\nSYS\n\nこんにちは<end_of_turn>\n<start_of_turn>model\n"
    chatml = render_prompt(CHATML, msgs)
    assert chatml.startswith("<|im_start|>system\nSYS<|im_end|>\n<|im_start|>user\nこんにちは")


def test_gemma_template_rejects_system_and_bad_alternation():
    with pytest.raises(TemplateError, match="System role not supported"):
        render_chat("gemma", [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}])
    with pytest.raises(TemplateError, match="alternate"):
        render_chat("gemma", [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


@pytest.mark.parametrize("template", [
    "{{ ().__class__.__base__.__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "{{ messages.append(1) }}",  # immutable: no mutating the caller's data
])
def test_sandbox_refuses_escapes(template):
    with pytest.raises(TemplateError) as info:
        render_chat(template, [{"role": "user", "content": "u"}])
    assert "\n" not in str(info.value)


def test_broken_template_is_a_template_error():
    with pytest.raises(TemplateError, match="chat template error"):
        render_chat("{% for %}", [])
