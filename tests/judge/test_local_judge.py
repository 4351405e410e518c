"""The local llama.cpp judge on the packaged Gemma 3 270M GGUF: reasoning, then a score
line whose digit a GBNF grammar forces into 1-7, weighted over the digit tokens. A 270M
base model is no judge: this checks the machinery, not the judgment."""

from __future__ import annotations

import os

import pytest

from pipelines.judge import Interaction, Judge, calibration_status
from pipelines.workspace import Workspace

pytestmark = pytest.mark.slow


async def test_the_local_judge_gives_a_grammar_shaped_verdict():
    ws = Workspace.load(os.path.join(os.path.dirname(__file__), "..", "..", "configs"))
    judge = Judge.open(ws, "local-gemma3", "ayane", criteria=["personality"])
    item = Interaction.from_pair("好きなケーキは？", "いちごのショートケーキが大好きですわ。", id="L1")
    verdict = await judge.score(item, "personality")
    await judge.aclose()
    assert verdict.status in ("ok", "invalid") and verdict.raw_text
    assert verdict.raw_text.splitlines()[-1][:-1] == "スコア: "  # the grammar's line
    if verdict.status == "ok":
        assert verdict.score in range(1, 8)
        assert 1.0 <= verdict.weighted_score <= 7.0
    assert verdict.judge_model == "embedded:gemma3-270m" and verdict.attempts == 1
    assert verdict.tokens > 1000  # the whole profile was in the prompt
    assert judge.store.rows("judgments")[0]["message_id"] == "L1"
    status = calibration_status(ws.settings.home_path(), "local-gemma3", "ayane", "personality",
                                verdict.prompt_version, verdict.judge_model)
    assert status.state == "uncalibrated"
