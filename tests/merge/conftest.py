"""Three tiny random Llama models of one architecture, built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.workspace import Workspace
from tests.merge.models import make_model


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("tiny_models")
    return [make_model(root / f"m{i}", seed=i) for i in range(3)]


@pytest.fixture
def workspace(tmp_path) -> Workspace:
    (tmp_path / "configs").mkdir()
    return Workspace.load(tmp_path / "configs")
