"""One loaded base, many adapters: variants on one base model share one worker process
and one copy of the base, the adapter switched per request; replies are those of separate
processes, whatever order the variants are asked in; a shared process survives the
closing of one of its variants, dies with the last, and after a death comes back with all
of them loaded."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from pipelines.config import GGUFVariant, HFVariant
from pipelines.inference.base import BackendError, GenerationOptions
from pipelines.inference.worker import WorkerBackend, shared_model_key, spawn_backend
from tests.inference.standin_backends import REPLY, write_standin_variant

STANDIN = "gguf=tests.inference.standin_backends:CrashBackend"
SHIPPED_LORA = Path(__file__).resolve().parents[2] / "configs/models/ayane-270m/adapter.gguf"


def ask(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def reply(backend, messages, options) -> tuple[str, list[int] | None]:
    deltas = list(backend.stream(messages, options))
    final = deltas[-1]
    assert final.done and final.stop_reason in ("eos", "length"), final
    return "".join(d.text for d in deltas[:-1]), final.extra.get("token_ids")


def resident(backend) -> list[dict]:
    """What the child of `backend` holds: its loaded copies and their adapters."""
    return backend.process.request("call", "asking", handle=backend.handle,
                                   method="resident_models")


# --- the protocol, on stand-ins (no model) ----------------------------------------------


@pytest.fixture
def standins(tmp_path, monkeypatch):
    """Two gguf variants on one placeholder file (a base and a 'LoRA' variant) and one on
    another file, served by the stand-in backend."""
    from pipelines.config import load_variant

    monkeypatch.setenv("KYARA_BACKEND_MODULES", STANDIN)
    (tmp_path / "models").mkdir()
    base = load_variant(write_standin_variant(tmp_path, tmp_path, "base"))
    tuned = base.model_copy(update={"name": "tuned", "lora_path": str(tmp_path / "l.gguf")})
    (tmp_path / "l.gguf").write_bytes(b"GGUF")
    other = load_variant(write_standin_variant(tmp_path, tmp_path, "other"))
    return base, tuned, other


def test_variants_on_one_base_share_a_process_until_the_last_closes(standins, tmp_path):
    base, tuned, other = standins
    home = tmp_path / "home"
    a, b, c = (spawn_backend(v, home) for v in (base, tuned, other))
    try:
        assert a.process is b.process and a.info["pid"] == b.info["pid"]
        assert c.info["pid"] != a.info["pid"]  # another base file: its own process
        assert a.shared_with == ["tuned"] and c.shared_with == []
        assert reply(b, ask("こんにちは"), GenerationOptions())[0] == REPLY
        pid = a.info["pid"]
        b.close()
        assert a.process.alive  # the base variant still uses it
        assert reply(a, ask("こんにちは"), GenerationOptions())[0] == REPLY
        assert a.info["pid"] == pid
        with pytest.raises(BackendError):
            b.render(ask("x"))  # a closed backend says so, and starts nothing
        # a variant opened now joins the live process
        again = spawn_backend(tuned, home)
        assert again.info["pid"] == pid
        again.close()
        a.close()
        assert not a.process.alive  # the last one closed: the process is gone
        assert (home / "logs" / "worker-base.log").is_file()  # named after the base file
    finally:
        for backend in (a, b, c):
            backend.close()


def test_a_death_is_one_line_for_the_variant_asking_and_all_come_back(standins, tmp_path,
                                                                      one_line):
    base, tuned, _ = standins
    a, b = WorkerBackend(base, tmp_path / "home"), WorkerBackend(tuned, tmp_path / "home")
    try:
        pid = a.info["pid"]
        with pytest.raises(BackendError) as caught:
            list(b.stream(ask("crash please"), GenerationOptions()))
        line = one_line(str(caught.value))
        assert line.startswith("variant 'tuned' (its model process also served variant 'base')")
        assert "killed by SIGSEGV" in line and "next message starts a fresh one" in line
        # the next request (the other variant's) starts one child with both loaded again
        assert reply(a, ask("こんにちは"), GenerationOptions())[0] == REPLY
        assert a.info["pid"] != pid and b.info["pid"] == a.info["pid"]
        assert reply(b, ask("こんにちは"), GenerationOptions())[0] == REPLY
        assert b.info["pid"] == a.info["pid"]  # no second restart: it was reloaded with a
        # a kill -9 while idle: the next request of either is simply served by a fresh one
        os.kill(a.info["pid"], signal.SIGKILL)
        a.process.proc.wait()
        assert reply(b, ask("こんにちは"), GenerationOptions())[0] == REPLY
    finally:
        a.close()
        b.close()


def test_a_variant_that_cannot_load_leaves_the_shared_process_to_the_others(
        standins, tmp_path, one_line):
    base, _, _ = standins
    home = tmp_path / "home"
    a = spawn_backend(base, home)
    try:
        broken = base.model_copy(update={"name": "broken", "lora_path": str(tmp_path / "x")})
        with pytest.raises(BackendError) as caught:
            spawn_backend(broken, home)
        assert "LoRA file not found" in one_line(str(caught.value))
        assert a.shared_with == []  # the failed variant is not attached
        assert reply(a, ask("こんにちは"), GenerationOptions())[0] == REPLY
    finally:
        a.close()
    assert not a.process.alive


def test_the_sharing_key_needs_no_engine_and_tells_bases_apart(tmp_path, gemma_dir,
                                                               adapter_dir):
    def hf(name, **extra):
        return HFVariant(name=name, backend="hf", model=str(gemma_dir), device="cpu", **extra)

    base = shared_model_key(hf("a"), tmp_path)
    assert shared_model_key(hf("b", adapter=str(adapter_dir)), tmp_path) == base
    assert shared_model_key(hf("c", dtype="float32"), tmp_path) == base  # auto on cpu
    assert shared_model_key(hf("d", attn_implementation="eager"), tmp_path) == base  # gemma2
    assert shared_model_key(hf("e", dtype="bfloat16"), tmp_path) != base
    assert shared_model_key(hf("f", n_threads=1), tmp_path) != base
    gguf = GGUFVariant(name="g", backend="gguf", embedded="gemma3-270m", chat_template="gemma")
    lora = gguf.model_copy(update={"name": "h", "lora_path": "x.gguf"})
    assert shared_model_key(gguf, tmp_path) == shared_model_key(lora, tmp_path)
    assert shared_model_key(gguf.model_copy(update={"n_ctx": 512}), tmp_path) != \
        shared_model_key(gguf, tmp_path)


# --- real models: replies identical to separate processes -------------------------------

GREEDY = GenerationOptions(max_new_tokens=12, temperature=0.0)


def conversation_steps(names: list[str]) -> list[tuple[str, list[dict[str, str]]]]:
    """One conversation, each turn answered by the variant named for it: (variant, the
    messages it is asked). Replies are filled in as they come (see `run_conversation`)."""
    questions = ["こんにちは、自己紹介をしてください。", "好きな紅茶は何ですか？",
                 "ミュージカルの夢を教えて。", "今日は何をしましたか？", "ありがとう。"]
    return [(name, ask(q)) for name, q in zip(names, questions, strict=False)]


def run_conversation(backends: dict[str, object], reference, names: list[str]
                     ) -> list[tuple[str, object, object]]:
    """Alternate variants mid-conversation on the shared backends; each turn's messages
    are also asked of `reference(name)`, that variant alone in a process of its own.
    (variant, shared reply, separate reply), as token ids."""
    history: list[dict[str, str]] = []
    turns = []
    for name, question in conversation_steps(names):
        messages = history + question
        shared, shared_ids = reply(backends[name], messages, GREEDY)
        alone, alone_ids = reply(reference(name), messages, GREEDY)
        turns.append((name, shared_ids or shared, alone_ids or alone))
        history = messages + [{"role": "assistant", "content": shared}]
    return turns


@pytest.fixture(scope="module")
def second_adapter(gemma_dir, tmp_path_factory):
    """Another LoRA on the tiny Gemma, with dropout: a copy left in training mode would
    make greedy replies differ from run to run."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(gemma_dir, attn_implementation="eager")
    torch.manual_seed(2)
    config = LoraConfig(r=4, lora_alpha=32, lora_dropout=0.5, init_lora_weights=False,
                        target_modules=["k_proj", "o_proj", "up_proj"])
    out = tmp_path_factory.mktemp("adapter-b")
    get_peft_model(base, config).save_pretrained(out)
    return out


def test_hf_base_and_adapters_in_one_process_reply_as_separate_ones(
        gemma_dir, adapter_dir, second_adapter, tmp_path):
    def variant(name, adapter=None):
        return HFVariant(name=name, backend="hf", model=str(gemma_dir), device="cpu",
                         adapter=str(adapter) if adapter else None)

    variants = {"base": variant("base"), "lora-a": variant("lora-a", adapter_dir),
                "lora-b": variant("lora-b", second_adapter)}
    home = tmp_path / "home"
    backends = {n: spawn_backend(v, home) for n, v in variants.items()}
    references = {n: WorkerBackend(v, home, share=False) for n, v in variants.items()}
    try:
        pids = {b.info["pid"] for b in backends.values()}
        assert len(pids) == 1, "the three variants are not one process"
        assert len({r.info["pid"] for r in references.values()} | pids) == 4
        copies = resident(backends["base"])
        assert len(copies) == 1 and len(copies[0]["adapters"]) == 2  # one base, two adapters
        assert copies[0]["users"] == 3
        order = ["base", "lora-a", "base", "lora-b", "lora-a"]
        turns = run_conversation(backends, references.get, order)
        for name, shared, alone in turns:
            assert shared == alone, f"{name}: the shared process replied differently"
        # and the adapters matter: on one question, three different replies
        answers = {n: reply(backends[n], ask("こんにちは"), GREEDY)[1] for n in variants}
        assert len({tuple(ids) for ids in answers.values()}) == 3
        # one variant closed: the others keep the one copy, and still reply as before
        backends.pop("lora-a").close()
        assert resident(backends["base"])[0]["users"] == 2
        assert reply(backends["base"], ask("こんにちは"), GREEDY)[1] == answers["base"]
        assert reply(backends["lora-b"], ask("こんにちは"), GREEDY)[1] == answers["lora-b"]
    finally:
        for backend in [*backends.values(), *references.values()]:
            backend.close()


@pytest.fixture
def gguf_variants(embedded_gguf):
    pytest.importorskip("llama_cpp")
    base = GGUFVariant(name="gemma3-270m", backend="gguf", path=str(embedded_gguf),
                       chat_template="gemma", n_ctx=1024, n_threads=2)
    tuned = base.model_copy(update={"name": "ayane-270m", "lora_path": str(SHIPPED_LORA)})
    return {"gemma3-270m": base, "ayane-270m": tuned}


def test_gguf_base_and_lora_in_one_process_reply_as_separate_ones(gguf_variants, tmp_path):
    """The embedded Gemma 3 270M and the shipped Ayane LoRA on it: one Llama in one process,
    the LoRA set per request. The conversation goes on from one variant to the other, so
    the prompt cached under one adapter is a prefix of the next prompt under the other:
    reused, it would leak (the reply differs); the switch resets the context. Each turn is
    compared with a fresh process of that variant alone: llama.cpp's sums differ in the
    last bits between a prompt evaluated whole and one on a cached prefix, so the
    references evaluate whole, as the shared process does after a switch."""
    home = tmp_path / "home"
    backends = {n: spawn_backend(v, home) for n, v in gguf_variants.items()}
    fresh: list[WorkerBackend] = []

    def reference(name: str) -> WorkerBackend:
        fresh.append(WorkerBackend(gguf_variants[name], home, share=False))
        if len(fresh) > 1:
            fresh.pop(0).close()
        return fresh[-1]

    try:
        assert backends["gemma3-270m"].info["pid"] == backends["ayane-270m"].info["pid"]
        loaded = resident(backends["ayane-270m"])
        assert len(loaded) == 1 and loaded[0]["adapters"] == [str(SHIPPED_LORA)]
        order = ["gemma3-270m", "ayane-270m", "gemma3-270m", "ayane-270m", "gemma3-270m"]
        for name, shared, alone in run_conversation(backends, reference, order):
            assert shared == alone, f"{name}: the shared process replied differently"
        base = reply(backends["gemma3-270m"], ask("こんにちは"), GREEDY)[0]
        tuned = reply(backends["ayane-270m"], ask("こんにちは"), GREEDY)[0]
        assert base != tuned, "the LoRA changed nothing"
    finally:
        for backend in [*backends.values(), *fresh]:
            backend.close()


def test_gguf_in_process_switching_never_reads_the_other_adapters_cache(gguf_variants):
    """The same, in one process without workers: the LoRA variant first (a fresh context),
    then the base on the same prompt (all of it but the last token cached under the LoRA),
    then the LoRA again; each reply is the one a fresh Llama of that variant gives."""
    from pipelines.inference.gguf import GGUFBackend, shared_models

    question = ask("好きな紅茶は何ですか？")
    before = shared_models()  # a session fixture may hold the base file at another n_ctx

    def ours():
        return {key: loras for key, loras in shared_models().items() if key not in before}

    tuned = GGUFBackend(gguf_variants["ayane-270m"])
    base = GGUFBackend(gguf_variants["gemma3-270m"])
    try:
        assert tuned.llm is base.llm and len(ours()) == 1
        first_tuned = reply(tuned, question, GREEDY)[0]
        switched_base = reply(base, question, GREEDY)[0]
        assert switched_base != first_tuned
        assert reply(base, question, GREEDY)[0] == switched_base  # same adapter: cache kept
        assert reply(tuned, question, GREEDY)[0] == first_tuned
        tuned.close()
        assert list(ours().values()) == [[]]  # the LoRA freed, the base kept
        assert reply(base, question, GREEDY)[0] == switched_base
    finally:
        tuned.close()
        base.close()
    assert ours() == {} and shared_models() == before
    alone = GGUFBackend(gguf_variants["gemma3-270m"])  # a fresh Llama: the base's own reply
    try:
        assert reply(alone, question, GREEDY)[0] == switched_base
    finally:
        alone.close()


# --- the memory they hold: each shared base once ------------------------------------------


def test_the_memory_estimate_counts_a_shared_base_once(gemma_dir, adapter_dir,
                                                       second_adapter, tmp_path):
    from pipelines.plan import RUNTIME_TORCH, inspect_model
    from pipelines.plan.resident import resident_bytes, resident_models

    def variant(name, adapter=None, **extra):
        return HFVariant(name=name, backend="hf", model=str(gemma_dir), device="cpu",
                         adapter=str(adapter) if adapter else None, **extra)

    base, a, b = variant("base"), variant("a", adapter_dir), variant("b", second_adapter)
    weights = inspect_model(gemma_dir).params * 4  # fp32 on the CPU
    adapters = sum(f.stat().st_size for d in (adapter_dir, second_adapter)
                   for f in d.glob("*.safetensors"))
    [one] = resident_models([base, a, b], tmp_path)
    assert one.variants == ["base", "a", "b"] and len(one.adapters) == 2
    assert one.weights == weights
    assert resident_bytes([base, a, b], tmp_path) == weights + adapters + RUNTIME_TORCH
    # another dtype is another copy in another process: counted again
    half = variant("half", dtype="bfloat16")
    assert len(resident_models([base, a, half], tmp_path)) == 2
    assert resident_bytes([base, half], tmp_path) == weights + weights // 2 + 2 * RUNTIME_TORCH


def test_the_estimate_counts_the_processes_spawn_backend_makes(standins, tmp_path):
    from pipelines.plan.resident import resident_models

    base, tuned, other = standins
    (tmp_path / "base.gguf").write_bytes(b"GGUF" + b"\0" * 996)  # the stand-in ignores it
    home = tmp_path / "home"
    residents = resident_models([base, tuned, other], home)
    assert [r.variants for r in residents] == [["base", "tuned"], ["other"]]
    assert residents[0].weights == 1000 and residents[0].adapters == {
        str((tmp_path / "l.gguf").resolve()): 4}
    backends = [spawn_backend(v, home) for v in (base, tuned, other)]
    try:
        assert len({b.info["pid"] for b in backends}) == len(residents)
    finally:
        for backend in backends:
            backend.close()
