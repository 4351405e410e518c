"""The openai paths against a real server whose chat template refuses the system role, as
Gemma 2's does: llama.cpp's own server (`python -m llama_cpp.server`) on 127.0.0.1, serving
the packaged Gemma 3 270M with Gemma 2's chat template (google/gemma-2-2b-jpn-it's
tokenizer_config.json, verbatim) written into the GGUF by gguf's own `gguf_new_metadata`.
No --chat_format: the server applies the file's Jinja template, so a system message is
refused by the template itself (HTTP 500 "System role not supported" from llama.cpp's
server; vLLM says the same with a 400, replayed in tests/judge/test_vllm_compat.py).

Run against it: the chat backend (ChatSession, as the console and `kyara ask` use it),
compare, the judge with the server's real logprobs, and a small eval job."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys

import pytest
import yaml

from pipelines.config import OpenAIVariant, load_job
from pipelines.inference.base import BackendError, GenerationOptions
from pipelines.inference.embedded import ensure_embedded
from pipelines.inference.openai_backend import OpenAIBackend
from tests.conftest import CONFIGS
from tests.inference.conftest import GEMMA2_TEMPLATE  # the published template, verbatim
from tests.test_llama_server import llama_server

pytestmark = pytest.mark.slow

MODEL = "gemma2-template"
SYSTEM = [{"role": "system", "content": "あなたは小野寺絢音です。"},
          {"role": "user", "content": "こんにちは"}]


@pytest.fixture(scope="module")
def gemma2_gguf(tmp_path_factory):
    """The 270M with Gemma 2's template in its metadata, made by gguf's own script."""
    home = tmp_path_factory.mktemp("home")
    source = ensure_embedded("gemma3-270m", home)
    (home / "template.jinja").write_text(GEMMA2_TEMPLATE, encoding="utf-8")
    target = home / "gemma2-template.gguf"
    subprocess.run([sys.executable, "-m", "gguf.scripts.gguf_new_metadata", str(source),
                    str(target), "--chat-template-file", str(home / "template.jinja"),
                    "--force"], check=True, capture_output=True)
    source.unlink()  # 250 MB: the copy is all the server needs
    return target


@pytest.fixture(scope="module")
def server(gemma2_gguf):
    log_path = gemma2_gguf.with_suffix(".log")
    with llama_server(gemma2_gguf, log_path, "--n_ctx", "8192", "--model_alias", MODEL) as base:
        yield base
    # the server applied the file's own template, not a built-in chat format
    assert "Using gguf chat template" in log_path.read_text(errors="replace")


@pytest.fixture(autouse=True)
def fresh_folds(monkeypatch):
    from pipelines.inference import openai_backend

    monkeypatch.setattr(openai_backend, "_FOLDED", set())


def variant(server: str, name: str = "gemma2-server", **extra) -> OpenAIVariant:
    return OpenAIVariant(name=name, backend="openai", model=MODEL, base_url=server,
                         api_key_env="KYARA_NO_KEY", **extra)


OPTIONS = GenerationOptions(max_new_tokens=12, temperature=0.0, seed=0)


def test_the_real_template_refuses_a_system_message(server):
    backend = OpenAIBackend(variant(server, system_prompt="native"))
    with pytest.raises(BackendError) as caught:
        list(backend.stream(SYSTEM, OPTIONS))
    assert "answered HTTP 500: System role not supported" in str(caught.value)


def test_auto_folds_after_the_refusal_and_streams(server):
    backend = OpenAIBackend(variant(server))
    deltas = list(backend.stream(SYSTEM, OPTIONS))
    final = deltas[-1]
    assert final.done and final.stop_reason in ("eos", "length"), final
    assert "refuses the system role (System role not supported)" in final.extra["notice"]
    assert json.loads(final.extra["rendered"]) == [
        {"role": "user", "content": "あなたは小野寺絢音です。\n\nこんにちは"}]
    # the second turn of the conversation goes folded at once: no notice, no refusal
    history = [*SYSTEM, {"role": "assistant", "content": "ごきげんよう。"},
               {"role": "user", "content": "好きなものは？"}]
    again = list(backend.stream(history, OPTIONS))
    assert again[-1].stop_reason in ("eos", "length") and "notice" not in again[-1].extra
    assert json.loads(again[-1].extra["rendered"])[0]["content"].startswith(
        "あなたは小野寺絢音です。\n\nこんにちは")


def test_fold_sends_the_same_text_the_gguf_backend_renders(server, gemma2_gguf):
    """One folding for all three backends: the server, given the folded messages, answers
    greedily what the in-process gguf backend answers on the same file and template."""
    from pipelines.config import GGUFVariant
    from pipelines.inference.gguf import GGUFBackend

    remote = OpenAIBackend(variant(server, system_prompt="fold"))
    served = "".join(d.text for d in remote.stream(SYSTEM, OPTIONS) if not d.done)
    local = GGUFBackend(GGUFVariant(name="local", backend="gguf", path=str(gemma2_gguf),
                                    n_ctx=512))
    try:
        assert "あなたは小野寺絢音です。\n\nこんにちは" in local.render(SYSTEM)
        here = "".join(d.text for d in local.stream(SYSTEM, OPTIONS) if not d.done)
    finally:
        local.close()
    assert served == here


@pytest.fixture
def workspace(tmp_path, server, monkeypatch):
    """configs/ with the real persona and criteria, two openai variants on the server and
    a judge on it; KYARA_HOME in tmp_path."""
    from pipelines.workspace import Workspace

    configs = tmp_path / "configs"
    shutil.copytree(CONFIGS / "personas", configs / "personas")
    shutil.copytree(CONFIGS / "judges" / "criteria", configs / "judges" / "criteria")
    (configs / "models").mkdir()
    (configs / "jobs").mkdir()
    for name in ("served-a", "served-b"):
        (configs / "models" / f"{name}.yaml").write_text(yaml.safe_dump({
            "name": name, "backend": "openai", "model": MODEL, "base_url": server,
            "api_key_env": "KYARA_NO_KEY", "persona": "ayane", "timeout_s": 240,
            "generation": {"max_new_tokens": 16, "temperature": 0.0, "seed": 0}}),
            encoding="utf-8")
    (configs / "judges" / "served-judge.yaml").write_text(yaml.safe_dump({
        "name": "served-judge", "provider": "openai_compatible", "model": MODEL,
        "base_url": server, "api_key_env": None, "criteria": ["personality"],
        "few_shot": 0, "concurrency": 1, "timeout_s": 240, "max_retries": 0,
        # llama_cpp.server computes top logprobs over the whole vocabulary in Python for
        # every token: a short answer keeps that to seconds on 2 cores
        "logprobs": True, "max_tokens": 24}), encoding="utf-8")
    home = tmp_path / "home"
    (configs / "kyara.yaml").write_text(yaml.safe_dump({"home": str(home), "rag": False}),
                                        encoding="utf-8")
    monkeypatch.setenv("KYARA_HOME", str(home))
    monkeypatch.setenv("KYARA_CONFIGS", str(configs))
    return Workspace.load(configs)


def test_a_chat_session_answers_and_logs_what_was_sent(workspace):
    from pipelines.chat import TurnDone, open_session

    session = open_session(workspace, persona="ayane", variant="served-a", rag=False)
    events = list(session.send("こんにちは", GenerationOptions(max_new_tokens=12,
                                                               temperature=0.0)))
    row = next(e.message for e in events if isinstance(e, TurnDone))
    assert row["status"] == "complete", row
    finals = [e for e in events if getattr(e, "done", False)]
    assert "refuses the system role" in finals[-1].extra["notice"]
    sent = json.loads(row["rendered_prompt"])  # the folded messages, as logged
    assert [m["role"] for m in sent] == ["user"]
    assert sent[0]["content"].endswith("\n\nこんにちは")
    assert sent[0]["content"].startswith(session.persona.prompts.system.strip()[:20])
    second = list(session.send("好きなミュージカルは？",
                               GenerationOptions(max_new_tokens=12, temperature=0.0)))
    row2 = next(e.message for e in second if isinstance(e, TurnDone))
    assert row2["status"] == "complete" and [m["role"] for m in json.loads(
        row2["rendered_prompt"])] == ["user", "assistant", "user"]


def test_compare_answers_every_column(workspace):
    from pipelines.chat import Combo, TurnDone, compare, open_session
    from pipelines.pool import BackendPool

    session = open_session(workspace, persona="ayane", variant="served-a", rag=False,
                           pool=BackendPool(OpenAIBackend))
    combos = [Combo(variant=workspace.variant(name), rag=False)
              for name in ("served-a", "served-b")]
    done = {index: event.message for index, event in
            compare(session, "趣味は何ですか？", combos,
                    GenerationOptions(max_new_tokens=12, temperature=0.0))
            if isinstance(event, TurnDone)}
    assert sorted(done) == [0, 1]
    assert all(row["status"] == "complete" for row in done.values()), {
        i: row["error"] for i, row in done.items()}
    session.pool.close()


def test_the_judge_reads_the_servers_real_logprobs(workspace):
    from pipelines.judge import Interaction, Judge

    judge = Judge.open(workspace, "served-judge", "ayane", store=None)
    interaction = Interaction.from_pair("好きなミュージカルは？", "レ・ミゼラブルですわ。")

    async def go():
        try:
            prompt = judge.prompt(interaction, "personality")
            text = prompt if isinstance(prompt, str) else prompt.text
            completion = await judge.provider.complete(text)
            verdict = await judge.score(interaction, "personality")
            return completion, verdict
        finally:
            await judge.aclose()

    completion, verdict = asyncio.run(go())
    # llama.cpp's own logprobs: one entry per generated token, the tokens spell the text,
    # each with its top alternatives
    assert completion.logprobs, completion
    spelled = b"".join(t.bytes if t.bytes is not None else t.token.encode()
                       for t in completion.logprobs)
    assert spelled.decode("utf-8", "replace").startswith(completion.text[:8])
    # a 270M model is no judge: the path holds — a parsed score (weighted from the real
    # logprobs where the digit is found) or `invalid` with the raw text, never a made-up
    # number
    assert verdict.status in ("ok", "invalid"), verdict
    assert verdict.raw_text
    if verdict.status == "ok":
        assert verdict.weighted_score is None or 1.0 <= verdict.weighted_score <= 7.0
    else:
        assert verdict.score is None and verdict.weighted_score is None


def test_a_digit_keeps_the_servers_alternatives(workspace):
    """Where the judge writes a digit, llama.cpp's own top alternatives come through the
    provider (the weighted score reads them there): several digits, a distribution that
    is not the chosen digit alone."""
    from pipelines.judge import Judge
    from pipelines.judge.parse import digit_of, score_distribution, weighted_from_distribution

    judge = Judge.open(workspace, "served-judge", "ayane", store=None)

    async def go():
        try:
            return await judge.provider.complete(
                "1から7までの数字を一つだけ、数字だけで答えてください。")
        finally:
            await judge.aclose()

    completion = asyncio.run(go())
    digits = [t for t in completion.logprobs or () if digit_of(t.token) is not None]
    assert digits, completion.text  # the 270M answers this with a digit, greedily
    first = digits[0]
    assert len(first.top) >= 5, first  # the judge asks for 20
    dist = score_distribution(first)
    assert len(dist) >= 2 and 0.0 < sum(dist.values()) <= 1.0 + 1e-6, dist
    weighted = weighted_from_distribution(dist)
    assert 1.0 <= weighted <= 7.0 and weighted != float(digit_of(first.token)), dist


def test_a_small_eval_job_on_the_server(workspace):
    from pipelines.jobs import JobContext
    from pipelines.jobs.eval import run
    from store import Store

    path = workspace.configs / "jobs" / "eval-served.yaml"
    path.write_text(yaml.safe_dump({
        "job": "eval", "name": "eval-served", "persona": "ayane", "variants": ["served-a"],
        "rag": [False], "sets": ["heldout"], "limits": {"heldout": 2},
        "judge": "served-judge", "criteria": ["personality"], "pairwise_criteria": [],
        "max_new_tokens": 16}, sort_keys=False), encoding="utf-8")
    run_dir = workspace.settings.home_path() / "runs" / "eval-served"
    run_dir.mkdir(parents=True)
    ctx = JobContext.create(workspace, run_dir,
                            store=Store.open(workspace.settings.store_path()))
    events = list(run(load_job(path), ctx))
    assert events[-1].type == "done", events[-1]
    notices = [e for e in events if e.type == "log" and "refuses the system role" in
               (e.message or "")]
    assert len(notices) == 1  # said once: the second reply went folded at once
    out = workspace.settings.home_path() / "evals" / "eval-served"
    replies = [json.loads(line) for line in
               (out / "replies.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(replies) == 2 and all(not r.get("error") for r in replies), replies
    assert all([m["role"] for m in json.loads(r["rendered_prompt"])] == ["user"]
               for r in replies)
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert results["headline"][0]["combo"] == "served-a"
