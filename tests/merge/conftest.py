"""Three tiny random Llama models of one architecture, built once per session; the evolve
tests' models (a tokenizer, a chat template, one model that answers with the marker) and
their scripted judge."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.workspace import Workspace
from tests.judge.scripted_judge_server import ScriptedServer
from tests.merge.evolve_job import KEY_ENV, score_marker, write_configs
from tests.merge.evolve_models import make_models
from tests.merge.models import make_model


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("tiny_models")
    return [make_model(root / f"m{i}", seed=i) for i in range(3)]


@pytest.fixture
def workspace(tmp_path) -> Workspace:
    (tmp_path / "configs").mkdir()
    return Workspace.load(tmp_path / "configs")


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> list[Path]:
    """The evolve models (tests/merge/evolve_models.py)."""
    return make_models(tmp_path_factory.mktemp("evolve_models"))


@pytest.fixture
def judge_server():
    with ScriptedServer(score_marker) as server:
        yield server


@pytest.fixture
def configs(tmp_path, judge_server, monkeypatch) -> Path:
    monkeypatch.setenv(KEY_ENV, "sk-test")
    return write_configs(tmp_path / "configs", judge_server.base_url)
