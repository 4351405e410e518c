"""Models in worker processes: the protocol, cancel, and above all death — a native crash,
os.abort(), kill -9 — which ends the worker and never the caller."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from pipelines.config import GGUFVariant
from pipelines.inference.base import BackendError, GenerationOptions
from pipelines.inference.worker import WorkerBackend, death_line
from tests.inference.standin_backends import PARTIAL, REPLY, standin_variant

STANDIN = "gguf=tests.inference.standin_backends:CrashBackend"
OPTIONS = GenerationOptions(max_new_tokens=64, temperature=0.0)


def ask(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


@pytest.fixture
def standin(tmp_path, monkeypatch):
    """A gguf variant whose worker runs the crashing stand-in instead of llama.cpp."""
    monkeypatch.setenv("KYARA_BACKEND_MODULES", STANDIN)
    backend = WorkerBackend(standin_variant(tmp_path), tmp_path / "home")
    yield backend
    backend.close()


def test_a_reply_streams_from_another_process(standin):
    assert standin.info["pid"] != os.getpid()
    assert standin.render(ask("こんにちは")) == "<user>こんにちは<model>"
    deltas = list(standin.stream(ask("こんにちは"), OPTIONS))
    assert "".join(d.text for d in deltas[:-1]) == REPLY
    final = deltas[-1]
    assert final.done and final.stop_reason == "eos" and final.stop_token == "<end_of_turn>"
    assert final.extra["pid"] == standin.info["pid"]  # it really ran over there
    assert standin.last is final


@pytest.mark.parametrize("word, signame", [("crash", "SIGSEGV"), ("abort", "SIGABRT")])
def test_a_native_crash_is_one_line_and_the_next_request_gets_a_fresh_worker(
        standin, word, signame, one_line):
    first_pid = standin.info["pid"]
    received = []
    with pytest.raises(BackendError) as caught:
        for delta in standin.stream(ask(f"{word} please"), OPTIONS):
            received.append(delta.text)
    assert "".join(received) == PARTIAL  # what streamed before the crash was delivered
    message = one_line(str(caught.value))
    assert "variant 'standin'" in message and f"killed by {signame}" in message
    assert "make rebuild-llama" in message and "next message starts a fresh one" in message
    # the next request starts a new process and is answered
    deltas = list(standin.stream(ask("こんにちは"), OPTIONS))
    assert "".join(d.text for d in deltas[:-1]) == REPLY
    assert standin.info["pid"] != first_pid


def test_closing_the_stream_cancels_in_the_worker_which_stays_warm(standin):
    pid = standin.info["pid"]
    stream = standin.stream(ask("こんにちは"), OPTIONS)
    got = [next(stream).text, next(stream).text]
    stream.close()
    assert "".join(got) == REPLY[:2]
    # the worker ended that stream (its stand-in saw the cancel) and serves the next one
    deltas = list(standin.stream(ask("こんにちは"), OPTIONS))
    assert deltas[-1].stop_reason == "eos" and standin.info["pid"] == pid


def test_a_worker_that_does_not_end_a_cancelled_stream_is_killed(tmp_path, monkeypatch):
    from pipelines.inference import worker

    monkeypatch.setenv("KYARA_BACKEND_MODULES", STANDIN)
    monkeypatch.setenv("KYARA_STANDIN_DELAY", "0.3")  # slow enough to be caught mid-reply
    monkeypatch.setattr(worker, "CANCEL_GRACE_S", 0.5)
    backend = WorkerBackend(standin_variant(tmp_path, "slow"), tmp_path / "home")
    try:
        stream = backend.stream(ask("こんにちは"), OPTIONS)
        next(stream)
        os.kill(backend.info["pid"], signal.SIGSTOP)  # frozen: it can neither stream nor stop
        stream.close()
        assert not backend.process.alive  # killed after the grace period, not waited for
        deltas = list(backend.stream(ask("こんにちは"), OPTIONS))  # a fresh one answers
        assert deltas[-1].stop_reason == "eos"
    finally:
        backend.close()


def test_a_load_error_in_the_worker_is_the_backends_one_line(tmp_path, one_line):
    variant = GGUFVariant(name="lost", backend="gguf", path=str(tmp_path / "none.gguf"),
                          chat_template="gemma")
    with pytest.raises(BackendError) as caught:
        WorkerBackend(variant, tmp_path)
    assert one_line(str(caught.value)) == (
        f"variant 'lost': model file not found: {tmp_path / 'none.gguf'}")


def test_death_line_names_the_cause():
    assert "the OOM killer or kill -9" in death_line("variant 'x'", -9, "generating", None)
    assert "exit code 3" in death_line("variant 'x'", 3, "generating", None)


def test_oom_in_the_log_is_named(tmp_path):
    log = tmp_path / "w.log"
    log.write_text("loading\nCUDA error: out of memory\n", encoding="utf-8")
    line = death_line("variant 'x'", -6, "loading the model", log)
    assert "out of GPU memory" in line and str(log) in line


def test_the_caller_never_imports_the_engines(tmp_path):
    """A reply streamed through a worker, in a fresh interpreter that also imports every
    console module: neither torch, transformers nor llama_cpp is loaded there."""
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    code = f"""
import importlib, pkgutil, sys
import console
for m in pkgutil.iter_modules(console.__path__):
    if m.name != '__main__':  # that one runs the CLI
        importlib.import_module('console.' + m.name)
from pipelines.config import parse_variant
from pipelines.inference.base import GenerationOptions
from pipelines.inference.worker import spawn_backend
v = parse_variant({{'name': 's', 'backend': 'gguf', 'path': {str(model)!r}, 'chat_template': 'gemma'}}, 't')
b = spawn_backend(v, {str(tmp_path)!r})
text = ''.join(d.text for d in b.stream([{{'role': 'user', 'content': 'hi'}}], GenerationOptions()))
b.close()
loaded = sorted({{'torch', 'transformers', 'llama_cpp'}} & set(sys.modules))
print(text, loaded)
"""
    env = {**os.environ, "KYARA_BACKEND_MODULES": STANDIN}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"{REPLY} []"


def test_kill_9_of_a_real_gguf_worker_while_it_streams(embedded_gguf, tmp_path, one_line):
    variant = GGUFVariant(name="gemma3-270m", backend="gguf", path=str(embedded_gguf),
                          chat_template="gemma", n_ctx=512)
    backend = WorkerBackend(variant, tmp_path)
    try:
        assert backend.info["settings"]["n_threads"] == len(os.sched_getaffinity(0))
        long = GenerationOptions(max_new_tokens=400, temperature=0.7, seed=1)
        stream = backend.stream(ask("ミュージカルについて長く話してください。"), long)
        got = [next(stream).text for _ in range(3)]
        os.kill(backend.info["pid"], signal.SIGKILL)
        with pytest.raises(BackendError) as caught:
            got += [d.text for d in stream]
        assert "killed by SIGKILL" in one_line(str(caught.value))
        # a fresh worker on the next request
        deltas = list(backend.stream(ask("こんにちは"), GenerationOptions(max_new_tokens=4,
                                                                      temperature=0.0)))
        assert deltas[-1].done and deltas[-1].completion_tokens >= 1
    finally:
        backend.close()


def test_completion_survives_the_pipe():
    from pipelines.judge.parse import TokenLogprob
    from pipelines.judge.providers import Completion, completion_from_json, completion_to_json

    c = Completion(text="スコア: 6", tokens=12, finish_reason="stop", logprobs=[
        TokenLogprob("6", -0.1, (("6", -0.1), ("5", -2.5)), b"6")])
    import json

    back = completion_from_json(json.loads(json.dumps(completion_to_json(c))))
    assert back == c


async def test_the_local_judge_runs_in_a_worker_and_survives_its_death(embedded_gguf, tmp_path):
    """The console's local llama.cpp judge: the same two-step score as in process, from a
    worker; a worker killed mid-judgment is a retryable ProviderError, and the next call
    gets a fresh worker."""
    import asyncio

    from pipelines.config import JudgeConfig
    from pipelines.judge.providers import ProviderError, make_provider

    home = tmp_path / "home"
    (home / "models").mkdir(parents=True)
    os.symlink(embedded_gguf, home / "models" / embedded_gguf.name)  # as ensure_embedded
    config = JudgeConfig(name="local", provider="llama_cpp", model="embedded:gemma3-270m",
                         api_key_env=None, criteria=["personality"], temperature=0.0)
    provider = make_provider(config, home=home, isolated=True)
    try:
        prompt = "次の返答を1から7で評価してください。返答: ごきげんよう、絢音ですわ。"
        completion = await provider.complete(prompt)
        assert completion.text.split("スコア: ")[-1] in list("1234567")
        digits = dict(completion.logprobs[-1].top)
        assert set(digits) == set("1234567")  # the probability of every score, G-Eval style
        pid = provider._process.pid
        task = asyncio.ensure_future(provider.complete(prompt))
        await asyncio.sleep(0.5)
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(ProviderError) as caught:
            await task
        assert caught.value.retryable and "killed by SIGKILL" in str(caught.value)
        again = await provider.complete(prompt)
        assert again.text == completion.text and provider._process.pid != pid
    finally:
        provider.unload()


def test_an_hf_model_runs_in_a_worker_with_every_usable_core(gemma_dir, tmp_path):
    from pipelines.config import HFVariant

    variant = HFVariant(name="tiny", backend="hf", model=str(gemma_dir), device="cpu")
    backend = WorkerBackend(variant, tmp_path)
    try:
        assert backend.info["n_threads"] == len(os.sched_getaffinity(0))
        assert backend.render(ask("こんにちは")).startswith("<bos><start_of_turn>user")
        deltas = list(backend.stream(ask("こんにちは"), GenerationOptions(max_new_tokens=5,
                                                                      temperature=0.0)))
        assert deltas[-1].done and 1 <= deltas[-1].completion_tokens <= 5
    finally:
        backend.close()
