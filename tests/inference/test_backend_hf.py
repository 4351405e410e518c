"""The transformers backend on tiny Gemma-2- and Llama-shaped models built in conftest."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

import pytest
import torch

from pipelines.config import HFVariant
from pipelines.inference.base import BackendError, GenerationOptions
from pipelines.inference.hf import HFBackend, cached_models

MESSAGES = [
    {"role": "system", "content": "あなたは小野寺絢音です。"},
    {"role": "user", "content": "好きな紅茶は何ですか？"},
]
GREEDY = GenerationOptions(max_new_tokens=10, temperature=0.0)


def variant(name, model_dir, adapter=None, **extra) -> HFVariant:
    return HFVariant(
        name=name,
        backend="hf",
        model=str(model_dir),
        adapter=str(adapter) if adapter else None,
        **extra,
    )


@pytest.fixture
def gemma(gemma_dir):
    backend = HFBackend(variant("tiny-gemma", gemma_dir))
    yield backend
    backend.close()


@contextmanager
def steer(backend, token_ids, value, after=0, delay_s=0.0):
    """Adds `value` to the logits of `token_ids` from the `after`-th forward pass on (the
    first pass reads the prompt and yields token 1), optionally sleeping each pass.
    Yields the pass counter."""
    head = backend.model.get_output_embeddings()
    calls = {"n": 0}

    def hook(module, args, output):
        calls["n"] += 1
        if delay_s:
            time.sleep(delay_s)
        if calls["n"] - 1 >= after:
            output = output.clone()
            output[..., token_ids] += value
        return output

    handle = head.register_forward_hook(hook)
    try:
        yield calls
    finally:
        handle.remove()


def no_eos(backend, **kw):
    return steer(backend, list(backend.eos_ids), -1e4, **kw)


def run(backend, options=GREEDY, messages=MESSAGES):
    deltas = list(backend.stream(messages, options))
    return deltas[:-1], deltas[-1]


# --- streaming --------------------------------------------------------------------------


def test_streams_text_then_one_final_delta(gemma):
    with no_eos(gemma):
        texts, final = run(gemma, GenerationOptions(max_new_tokens=12, temperature=0.0))
    assert len(texts) >= 2 and all(d.text and not d.done for d in texts)
    assert final.done and final.text == ""
    assert final.prompt_tokens == len(gemma.tokenize_prompt(MESSAGES))
    assert final.completion_tokens == 12
    assert final.ttft_s is not None and final.ttft_s > 0
    assert final.tokens_per_s is not None and final.tokens_per_s > 0
    # The streamed pieces add up to the decoded tokens: multi-byte characters split over
    # byte tokens come out whole.
    streamed = "".join(d.text for d in texts)
    assert streamed == gemma.tokenizer.decode(final.extra["token_ids"], skip_special_tokens=True)


def test_japanese_split_over_byte_tokens_is_decoded_whole(gemma):
    # A kanji the tokenizer never saw is three byte tokens; force the reply to be exactly
    # those, then <end_of_turn>.
    byte_tokens = gemma.tokenizer("鰯", add_special_tokens=False)["input_ids"]
    assert len(byte_tokens) == 3
    forced = byte_tokens + [gemma.tokenizer.convert_tokens_to_ids("<end_of_turn>")]
    head = gemma.model.get_output_embeddings()
    step = {"n": 0}

    def hook(module, args, output):
        output = output.clone()
        output[..., forced[min(step["n"], len(forced) - 1)]] += 1e4
        step["n"] += 1
        return output

    handle = head.register_forward_hook(hook)
    try:
        texts, final = run(gemma)
    finally:
        handle.remove()
    assert [d.text for d in texts] == ["鰯"]
    assert final.completion_tokens == 4 and final.stop_reason == "eos"


def test_max_new_tokens_ends_with_length(gemma):
    with no_eos(gemma):
        _, final = run(gemma, GenerationOptions(max_new_tokens=5, temperature=0.0))
    assert final.stop_reason == "length" and final.completion_tokens == 5
    assert final.stop_token is None


@pytest.mark.parametrize("token", ["<end_of_turn>", "<eos>"])
def test_each_end_token_stops_and_is_named(gemma, token):
    assert token in gemma.eos_ids.values()
    token_id = gemma.tokenizer.convert_tokens_to_ids(token)
    with steer(gemma, [token_id], 1e4, after=3):
        texts, final = run(gemma)
    assert final.stop_reason == "eos" and final.stop_token == token
    assert final.completion_tokens == 4  # three tokens, then the end token
    assert token not in "".join(d.text for d in texts)


def test_cancel_stops_generation_within_a_token(gemma):
    options = GenerationOptions(max_new_tokens=150, temperature=0.0)
    # 20 ms a token: 150 tokens would take 3 s.
    with no_eos(gemma, delay_s=0.02) as calls:
        stream = gemma.stream(MESSAGES, options)
        first = next(stream)
        assert first.text and not first.done
        stream.close()
        passes_at_close = calls["n"]
        time.sleep(0.1)
        assert calls["n"] == passes_at_close, "generation went on after the stream was closed"
    assert gemma.last.stop_reason == "cancel"
    assert gemma.last.completion_tokens < 20


def test_prompt_longer_than_context_is_a_one_line_error(gemma, one_line):
    long = [{"role": "user", "content": "紅茶 " * 400}]
    with pytest.raises(BackendError) as err:
        next(gemma.stream(long, GREEDY))
    message = one_line(str(err.value))
    n = len(gemma.tokenize_prompt(long))
    assert f"prompt is {n} tokens, the context window is 256" in message


def test_temperature_zero_is_deterministic_and_seed_is_honoured(gemma):
    _, a = run(gemma, GREEDY)
    _, b = run(gemma, GREEDY)
    assert a.extra["token_ids"] == b.extra["token_ids"]
    sampled = GenerationOptions(max_new_tokens=10, temperature=1.5, top_k=0, top_p=1.0, seed=7)
    _, c = run(gemma, sampled)
    _, d = run(gemma, sampled)
    assert c.extra["token_ids"] == d.extra["token_ids"]


def test_prompt_has_one_bos_and_gemma_control_tokens(gemma):
    ids = gemma.tokenize_prompt(MESSAGES)
    tok = gemma.tokenizer
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert tok.convert_tokens_to_ids("<start_of_turn>") in ids
    # The Gemma 2 template refuses a system role: the backend folded it into the user turn.
    assert gemma.render(MESSAGES).startswith(
        "<bos><start_of_turn>user\nあなたは小野寺絢音です。\n\n好きな"
    )


def test_llama_shaped_model_streams_with_its_own_template(llama_dir):
    backend = HFBackend(variant("tiny-llama", llama_dir))
    try:
        assert backend.render(MESSAGES).startswith("<bos>[system] あなたは")  # no folding
        with no_eos(backend):
            texts, final = run(backend, GenerationOptions(max_new_tokens=6, temperature=0.0))
        assert texts and final.stop_reason == "length" and final.completion_tokens == 6
    finally:
        backend.close()


def test_a_second_stream_in_the_same_thread_is_refused(gemma, one_line):
    first = gemma.stream(MESSAGES, GREEDY)
    next(first)
    with pytest.raises(BackendError) as err:
        next(gemma.stream(MESSAGES, GREEDY))
    one_line(str(err.value))
    first.close()
    assert list(gemma.stream(MESSAGES, GREEDY))[-1].done  # free again


# --- one copy shared by variants with and without adapter ---------------------------------


def _plain_greedy(backend, prompt_ids, n) -> list[int]:
    """Greedy ids from a fresh copy of the model, loaded as the backend loads it."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        backend.variant.model, attn_implementation="eager", dtype=backend.model.dtype
    ).to(backend.device)
    ids = torch.tensor([prompt_ids], device=backend.device)
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=n,
        do_sample=False,
        eos_token_id=list(backend.eos_ids),
        pad_token_id=0,
    )
    return out[0, len(prompt_ids) :].tolist()


def test_variants_share_one_copy_and_the_adapter_is_switched_per_request(gemma_dir, adapter_dir):
    base = HFBackend(variant("tiny-gemma", gemma_dir))
    try:
        before = run(base)[1].extra["token_ids"]
        tuned = HFBackend(variant("tiny-gemma-lora", gemma_dir, adapter=adapter_dir))
        try:
            assert len(cached_models()) == 1
            assert tuned.model is base.model  # base now sees the PeftModel wrapping it
            with_adapter = run(tuned)[1].extra["token_ids"]
            after = run(base)[1].extra["token_ids"]
            assert with_adapter != before, "the adapter changed nothing"
            assert after == before, "the adapter leaked into the base variant"
            plain = _plain_greedy(base, base.tokenize_prompt(MESSAGES), 10)
            assert before == plain
            # Two threads on the one copy take turns: each gets its own variant's reply.
            results = {}

            def reply(backend):
                results[backend.name] = run(backend)[1].extra["token_ids"]

            threads = [threading.Thread(target=reply, args=(b,)) for b in (base, tuned, base)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert results == {"tiny-gemma": before, "tiny-gemma-lora": with_adapter}
        finally:
            tuned.close()
    finally:
        base.close()
    assert cached_models() == {}  # the last user frees the copy


def test_missing_model_directory_is_a_one_line_error(tmp_path, one_line):
    with pytest.raises(BackendError) as err:
        HFBackend(variant("nowhere", tmp_path / "no-such-model"))
    assert str(tmp_path / "no-such-model") in one_line(str(err.value))


def test_missing_adapter_is_a_one_line_error_and_frees_the_copy(gemma_dir, tmp_path, one_line):
    with pytest.raises(BackendError) as err:
        HFBackend(variant("bad-lora", gemma_dir, adapter=tmp_path / "no-adapter"))
    assert "no-adapter" in one_line(str(err.value))
    assert cached_models() == {}


def test_truncated_weights_are_a_one_line_error(gemma_dir, tmp_path, one_line):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(gemma_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(BackendError) as err:
        HFBackend(variant("broken", broken))
    message = one_line(str(err.value))
    assert "'broken'" in message and str(broken) in message
    assert cached_models() == {}


def test_a_batch_answers_each_conversation_as_its_own_stream(gemma):
    """generate_batch (the eval job's path for hf variants): prompts of different lengths,
    left-padded into batches of two, give each conversation the reply and stop reason its
    own greedy stream gives."""
    questions = ["好きな紅茶は何ですか？", "犬の名前は？", "週末はどこへお出かけになりますの？"]
    conversations = [[MESSAGES[0], {"role": "user", "content": q}] for q in questions]
    options = GenerationOptions(max_new_tokens=12, temperature=0.0)
    batched = gemma.generate_batch(conversations, options, batch_size=2)
    assert len(batched) == 3
    for conversation, reply in zip(conversations, batched, strict=True):
        streamed = list(gemma.stream(conversation, options))
        text = "".join(d.text for d in streamed if not d.done)
        assert reply.done and reply.text == text
        assert reply.stop_reason == streamed[-1].stop_reason
        assert reply.completion_tokens == streamed[-1].completion_tokens
        assert reply.prompt_tokens == len(gemma.tokenize_prompt(conversation))
