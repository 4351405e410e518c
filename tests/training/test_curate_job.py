"""The curate job with a scripted judge: kept and dropped files, per-criterion counts, the
calibration gate, resume through the judge's cache, and a failure that drops nothing."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from pipelines.config import ConfigError, parse_job
from pipelines.jobs import JobContext, get_job
from pipelines.judge import Completion, ProviderError
from pipelines.judge.calibrate import Agreement, CalibrationReport, save_calibration
from pipelines.workspace import Workspace
from tests.conftest import CONFIGS
from tests.training.conftest import DIALOGUES, write_dialogues

LOW = {"t001", "t005", "t008"}  # the rows the scripted judge scores low on personality


class ScriptedProvider:
    """Scores from the reply: 2 for the LOW rows' replies on personality, 6 otherwise; a
    reply listed in `fail` gets a server error."""

    model = "scripted-judge"
    label = "scripted-judge @ test"
    local = False

    def __init__(self, fail: set[str] | None = None) -> None:
        self.calls = 0
        self.fail = fail or set()
        self.low = {r["messages"][-1]["content"] for r in DIALOGUES if r["id"] in LOW}

    async def complete(self, prompt: str) -> Completion:
        self.calls += 1
        if any(reply in prompt for reply in self.fail):
            raise ProviderError("server_error", "scripted failure", retryable=False)
        personality = "personalities and preferences" in prompt
        # The reply under judgment sits in the interactions block at the end of the prompt.
        score = 2 if personality and any(reply in prompt for reply in self.low) else 6
        return Completion(text=f"理由を述べます。\n{score}\n{score}", tokens=10)

    async def aclose(self) -> None:
        return None


@pytest.fixture
def curate_configs(tmp_path):
    root = tmp_path / "configs"
    persona = root / "personas" / "ayane"
    persona.mkdir(parents=True)
    shutil.copy(CONFIGS / "personas" / "ayane" / "persona.yaml", persona / "persona.yaml")
    shutil.copy(CONFIGS / "personas" / "ayane" / "calibration.jsonl", persona / "calibration.jsonl")
    write_dialogues(persona / "dialogues.jsonl")
    shutil.copytree(CONFIGS / "judges", root / "judges")
    (root / "judges" / "scripted.yaml").write_text(yaml.safe_dump({
        "name": "scripted", "provider": "openai_compatible", "model": "scripted-judge",
        "base_url": "http://127.0.0.1:9/v1", "api_key_env": None,
        "criteria": ["personality", "style"], "few_shot": 0, "max_retries": 0}),
        encoding="utf-8")
    return root


@pytest.fixture
def provider(monkeypatch):
    scripted = ScriptedProvider()
    monkeypatch.setattr("pipelines.judge.runner.make_provider",
                        lambda config, home=None, **kw: scripted)
    return scripted


def calibrate(ws, criterion: str, rho: float | None) -> None:
    from pipelines.judge.runner import load_criteria
    from pipelines.judge.verdict import judge_identity

    version = load_criteria(ws, [criterion])[criterion].prompt_version
    save_calibration(ws.settings.home_path(), CalibrationReport(
        judge="scripted", model="scripted-judge", provider="openai_compatible",
        persona="ayane", criterion=criterion, prompt_version=version, date="2026-11-25",
        few_shot=0, seed=0, agreement=Agreement(n=10, scored=10, spearman=rho),
        identity=judge_identity(ws.judge("scripted"))))  # measured against this server


def run_curate(ws, tmp_path, name="run", **changes):
    cfg = parse_job({"job": "curate", "name": "curate-tiny", "persona": "ayane",
                     "judge": "scripted", "criteria": ["personality", "style"],
                     "threshold": 4, "min_agreement": 0.6, **changes}, "test")
    ctx = JobContext.create(ws, tmp_path / name)
    return list(get_job("curate").run(cfg, ctx)), ctx


def lines(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_curation_keeps_drops_and_counts(curate_configs, tmp_path, provider):
    ws = Workspace.load(curate_configs)
    calibrate(ws, "personality", 0.8)
    calibrate(ws, "style", 0.7)
    source = curate_configs / "personas" / "ayane" / "dialogues.jsonl"
    before = source.read_bytes()
    events, ctx = run_curate(ws, tmp_path)
    summary = events[-1].summary
    assert events[-1].type == "done", events[-1]
    assert summary["kept"] == len(DIALOGUES) - len(LOW) and summary["dropped"] == len(LOW)
    assert summary["under_threshold"] == {"personality": len(LOW), "style": 0}
    kept = lines(ctx.home / "runs" / "curate-tiny" / "kept.jsonl")
    dropped = lines(ctx.home / "runs" / "curate-tiny" / "dropped.jsonl")
    assert {r["id"] for r in dropped} == LOW
    assert all(r["id"] not in LOW for r in kept) and "curation" not in kept[0]
    first = dropped[0]
    assert first["curation"]["personality"]["score"] == 2
    assert first["curation"]["style"]["score"] == 6
    assert first["reasons"] == ["personality 2 < 4"]
    assert first["curation"]["personality"]["reasoning"]
    assert source.read_bytes() == before  # the source is never modified
    logs = [e.message for e in events if e.type == "log"]
    assert any("personality: 3 of 12 under 4" in m for m in logs)

    # resumable: every verdict is in the store, a second run asks nothing
    calls = provider.calls
    again, _ = run_curate(ws, tmp_path, name="run2")
    assert provider.calls == calls
    assert again[-1].summary["dropped"] == len(LOW)


@pytest.mark.parametrize("rho, expected", [(None, "no calibration"),
                                           (0.3, "below min_agreement 0.6")])
def test_refuses_to_drop_without_good_calibration(curate_configs, tmp_path, provider, rho,
                                                  expected):
    ws = Workspace.load(curate_configs)
    calibrate(ws, "style", 0.9)
    if rho is not None:
        calibrate(ws, "personality", rho)
    with pytest.raises(ConfigError) as caught:
        run_curate(ws, tmp_path)
    message = str(caught.value)
    assert expected in message and "personality" in message
    assert "kyara judge calibrate --judge scripted --persona ayane" in message
    assert provider.calls == 0  # refused before asking anything
    assert not (ws.settings.home_path() / "runs" / "curate-tiny" / "dropped.jsonl").exists()


def test_failed_verdict_drops_nothing(curate_configs, tmp_path, monkeypatch):
    failing = ScriptedProvider(fail={DIALOGUES[1]["messages"][-1]["content"]})  # t001, a LOW row
    monkeypatch.setattr("pipelines.judge.runner.make_provider",
                        lambda config, home=None, **kw: failing)
    ws = Workspace.load(curate_configs)
    calibrate(ws, "personality", 0.8)
    calibrate(ws, "style", 0.8)
    events, ctx = run_curate(ws, tmp_path)
    summary = events[-1].summary
    assert summary["unjudged"] == 1 and summary["dropped"] == len(LOW) - 1
    kept_ids = {r["id"] for r in lines(ctx.home / "runs" / "curate-tiny" / "kept.jsonl")}
    assert "t001" in kept_ids
