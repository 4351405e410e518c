"""Fixtures for the judge: a scripted OpenAI-compatible server on 127.0.0.1, a copy of the
configs with a judge that points at it, and judges built on them."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from judge_testing import KEY, KEY_ENV, REPO, set_judge
from scripted_judge_server import ScriptedServer

from pipelines.judge import Judge
from pipelines.workspace import Workspace


@pytest.fixture
def server():
    with ScriptedServer() as srv:
        yield srv


@pytest.fixture
def configs(tmp_path, server, monkeypatch) -> Path:
    """The repo's configs plus judges/scripted.yaml, a judge on the scripted server."""
    root = tmp_path / "configs"
    shutil.copytree(REPO / "configs", root)
    judge = {
        "name": "scripted", "provider": "openai_compatible", "model": "scripted-judge",
        "base_url": server.base_url, "api_key_env": KEY_ENV,
        "criteria": ["personality", "style"], "few_shot": 3, "seed": 0, "concurrency": 4,
        "timeout_s": 5, "max_retries": 3, "temperature": 0.0, "logprobs": True,
    }
    (root / "judges" / "scripted.yaml").write_text(yaml.safe_dump(judge), encoding="utf-8")
    monkeypatch.setenv(KEY_ENV, KEY)
    return root


@pytest.fixture
def workspace(configs) -> Workspace:
    return Workspace.load(configs)


@pytest.fixture
def make_judge(workspace, configs):
    """make_judge(store=, criteria=[...], options={Judge kwargs}, **judge yaml changes)
    -> a Judge with fast back-off on the scripted server."""
    def build(*, store: bool = True, criteria=None, options=None, **changes) -> Judge:
        if changes:
            set_judge(configs, **changes)
        ws = Workspace.load(configs)
        judge = Judge.open(ws, "scripted", "ayane", criteria=criteria, store=True if store else None,
                           **{"backoff_s": 0.01, "flush_s": 0.05, **(options or {})})
        return judge

    return build


@pytest.fixture
def unused_port() -> int:
    import socket

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
