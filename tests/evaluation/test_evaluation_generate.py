"""pipelines.evaluation's generation on the tiny models of tests/inference: what it stops
on, left padding whatever the tokenizer says, eos and length stops in one batch, the
prompt the chat engine builds, and replies through a ChatBackend."""

from __future__ import annotations

from contextlib import contextmanager
from types import SimpleNamespace

import pytest

from pipelines.evaluation import (
    end_of_generation_ids,
    generate,
    prompt_ids,
    replies_from_backend,
)
from pipelines.inference.base import Delta

QUESTIONS = ["お名前は？", "好きな飲み物を教えてくださいませ。", "犬を飼っていますか？",
             "Hello there, how are you today?", "夢は？"]


@pytest.fixture(scope="module")
def gemma(gemma_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gemma_dir)
    model = AutoModelForCausalLM.from_pretrained(gemma_dir, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    return model, tok


@contextmanager
def steer(model, rows_and_ids, value, after=0):
    """Adds `value` to the logits of (row, token ids) from the `after`-th forward pass on
    (the first pass reads the prompt and gives new token 1)."""
    calls = {"n": 0}

    def hook(module, args, output):
        calls["n"] += 1
        if calls["n"] - 1 >= after:
            output = output.clone()
            for row, ids in rows_and_ids:
                output[row, ..., ids] += value
        return output

    handle = model.get_output_embeddings().register_forward_hook(hook)
    try:
        yield calls
    finally:
        handle.remove()


# --- end of generation ------------------------------------------------------------------


def test_gemma_stops_on_end_of_turn_and_eos(gemma):
    model, tok = gemma
    ids = end_of_generation_ids(model, tok)
    eos, eot = tok.eos_token_id, tok.convert_tokens_to_ids("<end_of_turn>")
    assert ids == {eos: "<eos>", eot: "<end_of_turn>"}
    assert list(ids) == [eos, eot]  # the model's own first, then <end_of_turn>


def test_end_ids_through_a_peft_model_are_the_bases(gemma_dir, adapter_dir, gemma):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, tok = gemma
    base = AutoModelForCausalLM.from_pretrained(gemma_dir)
    wrapped = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False)
    assert end_of_generation_ids(wrapped, tok) == end_of_generation_ids(base, tok)


def test_end_ids_read_a_declared_list_and_drop_what_is_not_an_id(llama_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(llama_dir)
    eos, eot = tok.eos_token_id, tok.convert_tokens_to_ids("<end_of_turn>")
    declared = SimpleNamespace(generation_config=SimpleNamespace(
        eos_token_id=[eot, None, -1, eos, eot]))
    assert list(end_of_generation_ids(declared, tok)) == [eot, eos]
    nothing = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=None))
    assert list(end_of_generation_ids(nothing, tok)) == [eos, eot]  # the tokenizer's


# --- generation ---------------------------------------------------------------------------


def test_the_prompt_is_the_chat_engines_with_the_system_folded(gemma):
    _, tok = gemma
    ids = prompt_ids(tok, tok.chat_template, "あなたは絢音。", "お名前は？")
    # the Gemma 2 template raises on a system role: the system text is folded
    assert tok.decode(ids) == ("<bos><start_of_turn>user\nあなたは絢音。\n\nお名前は？"
                               "<end_of_turn>\n<start_of_turn>model\n")
    assert ids.count(tok.bos_token_id) == 1


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_batches_pad_on_the_left_whatever_the_tokenizer_says(gemma, padding_side):
    model, tok = gemma
    tok.padding_side = padding_side
    try:
        kw = {"template": tok.chat_template, "system": "あなたは絢音。", "max_new_tokens": 8}
        lengths = {len(prompt_ids(tok, kw["template"], kw["system"], q)) for q in QUESTIONS}
        assert len(lengths) > 1  # prompts of several lengths: the batch is padded
        one_by_one = generate(model, tok, QUESTIONS, batch_size=1, **kw)
        batched = generate(model, tok, QUESTIONS, batch_size=4, **kw)
    finally:
        tok.padding_side = "left"
    assert [r.question for r in batched] == QUESTIONS
    assert [(r.text, r.stop, r.tokens) for r in batched] == \
        [(r.text, r.stop, r.tokens) for r in one_by_one]


def test_stop_reasons_eos_and_length_in_one_batch(gemma):
    model, tok = gemma
    ends = list(end_of_generation_ids(model, tok))
    eot = tok.convert_tokens_to_ids("<end_of_turn>")
    # row 0 is pushed onto <end_of_turn> at its 4th token, the others kept off every end id
    with steer(model, [(slice(1, None), ends)], -1e4), \
            steer(model, [(0, [eot])], 1e4, after=3):
        replies = generate(model, tok, QUESTIONS[:3], template=tok.chat_template,
                           max_new_tokens=7)
    assert replies[0].stop == "eos" and replies[0].tokens == 3
    assert "<end_of_turn>" not in replies[0].text
    assert [(r.stop, r.tokens) for r in replies[1:]] == [("length", 7), ("length", 7)]
    # the default ids stop a reply too: the tokenizer's EOS, from the first token
    with steer(model, [(slice(None), [tok.eos_token_id])], 1e4):
        first = generate(model, tok, QUESTIONS[:2], template=tok.chat_template,
                         max_new_tokens=5)
    assert [(r.text, r.stop, r.tokens) for r in first] == [("", "eos", 0), ("", "eos", 0)]


def test_given_end_ids_replace_the_models(gemma):
    model, tok = gemma
    plain = generate(model, tok, QUESTIONS[:1], template=tok.chat_template, max_new_tokens=6)
    assert plain[0].stop == "length"
    prompt = prompt_ids(tok, tok.chat_template, None, QUESTIONS[0])
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False,
                             eos_token_id=list(end_of_generation_ids(model, tok)),
                             pad_token_id=tok.pad_token_id)
    third = out[0, len(prompt) + 2].item()
    cut = generate(model, tok, QUESTIONS[:1], template=tok.chat_template, max_new_tokens=6,
                   end_ids=[third])
    assert cut[0].stop == "eos" and cut[0].tokens == out[0, len(prompt):].tolist().index(third)


# --- through a ChatBackend ----------------------------------------------------------------


class ScriptedBackend:
    name = "scripted"

    def __init__(self, replies):
        self.replies = list(replies)
        self.seen = []

    def stream(self, messages, options):
        self.seen.append((messages, options))
        text, stop = self.replies.pop(0)
        yield Delta(text=text[:2])
        yield Delta(text=text[2:])
        yield Delta(done=True, stop_reason=stop, completion_tokens=len(text),
                    error="boom" if stop == "error" else None)


def test_replies_from_a_backend_are_greedy_and_carry_the_stop():
    backend = ScriptedBackend([("紅茶ですわ。", "eos"), ("長い話", "length")])
    replies = replies_from_backend(backend, "あなたは絢音。", ["好きな飲み物は？", "話して"], 16)
    assert [(r.question, r.text, r.stop, r.tokens) for r in replies] == [
        ("好きな飲み物は？", "紅茶ですわ。", "eos", 6), ("話して", "長い話", "length", 3)]
    messages, options = backend.seen[0]
    assert messages[0] == {"role": "system", "content": "あなたは絢音。"}
    assert (options.temperature, options.top_k, options.max_new_tokens) == (0.0, 1, 16)


def test_a_backend_reply_that_fails_names_the_question():
    backend = ScriptedBackend([("途中", "error")])
    with pytest.raises(RuntimeError, match="scripted: no reply to '話して': boom"):
        replies_from_backend(backend, None, ["話して"], 8)
