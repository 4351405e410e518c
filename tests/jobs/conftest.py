"""Fixtures for the job tests: a tiny configs/ tree (the ayane persona with 5 facts) and
the stand-in jobs of fake_job.py, reachable from subprocesses through KYARA_JOB_MODULES."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from pipelines.workspace import Workspace
from tests.conftest import CONFIGS

FACTS = [
    {"id": "f1", "topic": "basics", "text": "絢音は18歳の高校3年生である。"},
    {"id": "f2", "topic": "family", "text": "絢音の兄はボストンの大学に留学している。"},
    {"id": "f3", "topic": "dog", "text": "絢音の愛犬はゴールデンレトリバーのレオである。"},
    {"id": "f4", "topic": "dream", "text": "絢音の夢はミュージカル女優になることだ。"},
    {"id": "f5", "topic": "school", "text": "絢音は演劇部の部長を務めている。"},
]
FAKE_MODULES = "train=tests.jobs.fake_job"


@pytest.fixture
def configs(tmp_path) -> Path:
    root = tmp_path / "configs"
    persona = root / "personas" / "ayane"
    persona.mkdir(parents=True)
    shutil.copy(CONFIGS / "personas" / "ayane" / "persona.yaml", persona / "persona.yaml")
    (persona / "knowledge.jsonl").write_text(
        "".join(json.dumps(f, ensure_ascii=False) + "\n" for f in FACTS), encoding="utf-8")
    (root / "jobs").mkdir()
    (root / "jobs" / "index-tiny.yaml").write_text(
        "job: index\nname: index-tiny\npersona: ayane\n", encoding="utf-8")
    return root


@pytest.fixture
def workspace(configs) -> Workspace:
    return Workspace.load(configs)


@pytest.fixture
def fake_jobs(monkeypatch) -> None:
    """`job: train` runs tests/jobs/fake_job.py, here and in every subprocess we start."""
    monkeypatch.setenv("KYARA_JOB_MODULES", FAKE_MODULES)


@pytest.fixture
def job_file(configs) -> Callable[..., Path]:
    """Write a stand-in job file: job_file("slow", steps=20)."""

    def write(mode: str, steps: int = 3, **extra: object) -> Path:
        lines = ["job: train", f"name: {mode}-job", "base: none", f"max_steps: {steps}"]
        lines += [f"{key}: {value}" for key, value in extra.items()]
        path = configs / "jobs" / f"{mode}.yaml"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return path

    return write


def wait_for(predicate: Callable[[], object], timeout: float = 30.0,
             interval: float = 0.05, what: str = "condition") -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)
