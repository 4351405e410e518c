"""The OpenAI-compatible paths against a real server: llama.cpp's own (llama_cpp.server)
on 127.0.0.1 with the packaged Gemma 3 270M. The chat backend streams from it; the judge
scores through it and keeps the raw text whatever the small model answers."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import yaml

from pipelines.config import OpenAIVariant
from pipelines.inference.base import GenerationOptions
from pipelines.inference.embedded import ensure_embedded
from pipelines.inference.openai_backend import OpenAIBackend

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def llama_server(model, log_path, *args: str):
    """`python -m llama_cpp.server` on 127.0.0.1 with `model` and `args`; its base URL once
    it answers /v1/models (2 minutes at most); terminated on exit."""
    port = free_port()
    log = open(log_path, "wb")  # not a pipe: llama.cpp logs would fill it and block
    proc = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--host", "127.0.0.1",
         "--port", str(port), *args],
        stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{base}/models", timeout=1) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                time.sleep(0.5)
        else:
            proc.kill()
            raise AssertionError(log_path.read_text(errors="replace")[-2000:])
        yield base
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(10)
        log.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    model = ensure_embedded("gemma3-270m", home)
    with llama_server(model, home / "server.log", "--n_ctx", "4096", "--chat_format", "gemma",
                      "--model_alias", "gemma3-270m") as base:
        yield base


def test_openai_backend_streams_from_llama_cpp_server(server):
    backend = OpenAIBackend(OpenAIVariant(name="local", backend="openai", model="gemma3-270m",
                                          base_url=server, api_key_env="KYARA_NO_KEY"))
    deltas = list(backend.stream([{"role": "user", "content": "こんにちは"}],
                                 GenerationOptions(max_new_tokens=12, temperature=0.0)))
    final = deltas[-1]
    assert final.done and final.stop_reason in ("eos", "length")
    assert any(d.text for d in deltas[:-1])
    assert final.completion_tokens is None or final.completion_tokens <= 12


def test_judge_through_llama_cpp_server(server, tmp_path, monkeypatch):
    import shutil

    from pipelines.judge import Interaction, Judge
    from pipelines.workspace import Workspace
    from tests.conftest import CONFIGS

    configs = tmp_path / "configs"
    shutil.copytree(CONFIGS, configs)
    (configs / "judges" / "local-server.yaml").write_text(yaml.safe_dump({
        "name": "local-server", "provider": "openai_compatible", "model": "gemma3-270m",
        "base_url": server, "api_key_env": None, "criteria": ["personality"],
        "few_shot": 1, "concurrency": 1, "timeout_s": 240, "max_retries": 0,
        # llama_cpp.server computes top logprobs over the whole vocabulary in Python for
        # every token: far too slow on 2 cores for a test; the budget keeps the small model
        # from rambling to the end of the context
        "logprobs": False, "max_tokens": 160}),
        encoding="utf-8")
    ws = Workspace.load(configs)
    judge = Judge.open(ws, "local-server", "ayane", store=None)
    import asyncio

    verdict = asyncio.run(judge.score(
        Interaction.from_pair("好きなミュージカルは？", "レ・ミゼラブルですわ。"), "personality"))
    # a 270M base model is no judge: the point is the path — a parsed score or `invalid`
    # with the raw text kept, never an exception and never a made-up number
    assert verdict.status in ("ok", "invalid"), verdict
    assert verdict.raw_text
    if verdict.status == "invalid":
        assert verdict.score is None
