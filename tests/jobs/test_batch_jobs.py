"""`batch: true` on the eval and curate jobs, against the scripted server with the Batch API
(tests/judge/scripted_batch_server.py): the same figures as a live run, the plan priced at
the batch price, batch-<stage>.json in the output folder, a rerun that sends nothing, and
a refused batch that stops the job in one line."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from pipelines.config import ConfigError, parse_job
from tests.conftest import CONFIGS
from tests.jobs.eval_standins import judge_text
from tests.jobs.test_eval_job import env, job_file, run_job  # noqa: F401 (fixtures)
from tests.judge.scripted_batch_server import BatchScript, BatchServer
from tests.judge.scripted_judge_server import Reply
from tests.training.conftest import DIALOGUES, write_dialogues


@pytest.fixture
def server():
    with BatchServer(lambda request: Reply(text=judge_text(request.prompt))) as srv:
        yield srv


def test_eval_in_batches_gives_the_live_figures_at_half_the_price(env, server):  # noqa: F811
    events, _ = run_job(env, job_file(env, batch=True, batch_poll_s=0.01))
    final = events[-1]
    assert final.type == "done", final
    assert server.live == []                        # every verdict came from a batch
    assert sorted(server.batches) == ["batch_1", "batch_2"]  # the judge stage, pairwise
    assert len(server.batch_bodies) == 42           # 30 scores + 12 pairwise orders
    out = env["home"] / "evals" / "eval-test"
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    rows = {row["combo"]: row for row in results["headline"]}
    assert rows["ayane-s"]["criteria"]["personality"]["mean"] == pytest.approx(6.0)
    assert rows["base-s"]["criteria"]["personality"]["mean"] == pytest.approx(2.0)
    assert rows["ayane-s"]["pairwise"]["personality"]["win"]["k"] == 6
    for stage, batch_id in (("judge", "batch_1"), ("pairwise", "batch_2")):
        state = json.loads((out / f"batch-{stage}.json").read_text())
        assert state["batch_id"] == batch_id and state["collected"] is True
    # the plan: half the live prices, and it says so
    plan = json.loads((out / "plan.json").read_text(encoding="utf-8"))
    assert plan["judge"]["prices_usd_per_mtok"] == {"input": 0.075, "output": 0.3}
    assert plan["judge"]["pricing"] == "Batch API prices (half the live prices)"
    assert any("Batch API prices (half the live prices)" in (e.message or "")
               for e in events if e.type == "log")
    progress = [e for e in events if e.type == "progress" and e.unit == "requests"]
    assert {e.stage for e in progress} == {"judge", "pairwise"}

    # a rerun: everything is in the judgments cache, nothing is sent
    again, _ = run_job(env, job_file(env, batch=True, batch_poll_s=0.01))
    assert again[-1].type == "done"
    assert len(server.batches) == 2 and server.live == [] and len(server.uploads()) == 2


def test_eval_plan_uses_batch_prices_when_the_judge_gives_them(env, server):  # noqa: F811
    path = env["configs"] / "judges" / "scripted.yaml"
    judge = yaml.safe_load(path.read_text(encoding="utf-8"))
    judge["batch_prices"] = {"input": 0.05, "output": 0.2}
    path.write_text(yaml.safe_dump(judge), encoding="utf-8")
    with pytest.raises(ConfigError, match="above max_cost_usd"):
        run_job(env, job_file(env, batch=True, max_cost_usd=0.0))
    plan = json.loads((env["home"] / "evals" / "eval-test" / "plan.json").read_text())
    assert plan["judge"]["pricing"] == "Batch API prices (batch_prices from the judge config)"
    assert plan["judge"]["prices_usd_per_mtok"] == {"input": 0.05, "output": 0.2}
    assert server.batches == {}


# --- curate ------------------------------------------------------------------------------

LOW = {"t001", "t005", "t008"}


@pytest.fixture
def curate_ws(tmp_path, server):
    from pipelines.judge.calibrate import Agreement, CalibrationReport, save_calibration
    from pipelines.judge.runner import load_criteria
    from pipelines.judge.verdict import judge_identity
    from pipelines.workspace import Workspace

    low = {r["messages"][-1]["content"] for r in DIALOGUES if r["id"] in LOW}

    def respond(request):  # personality 2 for the LOW rows' replies, 6 otherwise
        prompt = request.prompt
        score = 2 if "personalities and preferences" in prompt and any(
            reply in prompt for reply in low) else 6
        return Reply(text=f"理由を述べます。\n{score}\n{score}")

    server.responder = respond
    root = tmp_path / "configs"
    persona = root / "personas" / "ayane"
    persona.mkdir(parents=True)
    for name in ("persona.yaml", "calibration.jsonl"):
        shutil.copy(CONFIGS / "personas" / "ayane" / name, persona / name)
    write_dialogues(persona / "dialogues.jsonl")
    shutil.copytree(CONFIGS / "judges", root / "judges")
    (root / "judges" / "scripted.yaml").write_text(yaml.safe_dump({
        "name": "scripted", "provider": "openai_compatible", "model": "scripted-judge",
        "base_url": server.base_url, "api_key_env": None, "criteria": ["personality", "style"],
        "few_shot": 0, "max_retries": 0, "prices": {"input": 0.15, "output": 0.6}}),
        encoding="utf-8")
    ws = Workspace.load(root)
    for criterion in ("personality", "style"):
        version = load_criteria(ws, [criterion])[criterion].prompt_version
        save_calibration(ws.settings.home_path(), CalibrationReport(
            judge="scripted", model="scripted-judge", provider="openai_compatible",
            persona="ayane", criterion=criterion, prompt_version=version, date="2026-11-25",
            few_shot=0, seed=0, agreement=Agreement(n=10, scored=10, spearman=0.8),
            identity=judge_identity(ws.judge("scripted"))))  # measured against this server
    return ws


def run_curate(ws, tmp_path, name="run"):
    from pipelines.jobs import JobContext, get_job

    cfg = parse_job({"job": "curate", "name": "curate-tiny", "persona": "ayane",
                     "judge": "scripted", "criteria": ["personality", "style"],
                     "threshold": 4, "batch": True, "batch_poll_s": 0.01}, "test")
    ctx = JobContext.create(ws, tmp_path / name)
    return list(get_job("curate").run(cfg, ctx)), ctx


def test_curate_in_a_batch_drops_what_a_live_run_drops(curate_ws, tmp_path, server):
    server.script = BatchScript(fail=lambda body: DIALOGUES[0]["messages"][-1]["content"]
                                in body["messages"][0]["content"])
    events, ctx = run_curate(curate_ws, tmp_path)
    summary = events[-1].summary
    assert events[-1].type == "done", events[-1]
    assert summary["dropped"] == len(LOW) and summary["unjudged"] == 0
    assert len(server.batches) == 1 and len(server.batch_bodies) == 2 * len(DIALOGUES)
    assert len(server.live) == 2       # the first dialogue's two error-file rows, asked live
    folder = ctx.home / "runs" / "curate-tiny"
    assert json.loads((folder / "batch.json").read_text())["collected"] is True
    dropped = [json.loads(line) for line in (folder / "dropped.jsonl").read_text().splitlines()]
    assert {r["id"] for r in dropped} == LOW
    assert any("half the live prices" in (e.message or "") for e in events)

    again, _ = run_curate(curate_ws, tmp_path, name="run2")
    assert again[-1].summary["dropped"] == len(LOW)
    assert len(server.batches) == 1 and len(server.live) == 2  # nothing sent again


def test_curate_batch_refused_is_one_line(curate_ws, tmp_path, server):
    server.script = BatchScript(create_status=429)
    with pytest.raises(ConfigError) as caught:
        run_curate(curate_ws, tmp_path)
    message = str(caught.value)
    assert "\n" not in message and "HTTP 429" in message and "batch: false" in message
    assert server.live == []
