"""The job contract in-process: `list(job.run(cfg, ctx))` for the index job on a 5-fact
persona; kinds not implemented yet answer with one clear error event."""

from __future__ import annotations

import pytest

from pipelines.config import ConfigError, load_job
from pipelines.jobs import JobCancelled, JobContext, get_job, is_implemented
from store import Store
from tests.jobs.conftest import FACTS


@pytest.fixture
def ctx(workspace, tmp_path):
    return JobContext.create(workspace, tmp_path / "run",
                             store=Store.open(workspace.settings.store_path()))


def test_index_job_indexes_the_persona(configs, ctx):
    cfg = load_job(configs / "jobs" / "index-tiny.yaml")
    events = list(get_job("index").run(cfg, ctx))
    types = [e.type for e in events]
    assert types[0] == "start" and types[-1] == "done"
    assert [e.stage for e in events if e.type == "stage"] == ["load", "embedder", "index"]
    assert [(e.current, e.total, e.unit) for e in events if e.type == "progress"] == [
        (0, 5, "facts"), (5, 5, "facts")]
    metrics = {e.name: e.value for e in events if e.type == "metric"}
    assert metrics["facts_indexed"] == 5 and metrics["seconds"] >= 0
    summary = events[-1].summary
    assert (summary["added"], summary["updated"], summary["removed"], summary["unchanged"]) == (
        5, 0, 0, 0)
    assert {r["fact_id"] for r in ctx.store.rows("knowledge")} == {f["id"] for f in FACTS}

    again = list(get_job("index").run(cfg, ctx))[-1].summary
    assert (again["added"], again["unchanged"]) == (0, 5)


def test_index_job_refuses_a_persona_without_knowledge(configs, ctx):
    (configs / "personas" / "ayane" / "knowledge.jsonl").unlink()
    cfg = load_job(configs / "jobs" / "index-tiny.yaml")
    with pytest.raises(ConfigError, match="knowledge.jsonl: no such file"):
        list(get_job("index").run(cfg, ctx))


def test_a_cancelled_context_stops_the_job(configs, ctx):
    ctx.cancel()
    cfg = load_job(configs / "jobs" / "index-tiny.yaml")
    with pytest.raises(JobCancelled):
        list(get_job("index").run(cfg, ctx))


def test_kinds_not_implemented_yet_say_so(configs, ctx, monkeypatch):
    from pipelines import jobs

    monkeypatch.delitem(jobs.JOBS, "eval")  # every kind runs today: stands for the next one
    path = configs / "jobs" / "eval-x.yaml"
    path.write_text("job: eval\nname: eval-x\nvariants: [v]\n", encoding="utf-8")
    cfg = load_job(path)
    assert not is_implemented("eval") and is_implemented("index")
    events = list(get_job("eval").run(cfg, ctx))
    assert len(events) == 1 and events[0].type == "error"
    assert events[0].kind == "not_implemented"
    assert events[0].message == "job kind 'eval' is not implemented yet"


def test_unknown_kind_and_bad_hook_are_one_line_errors(monkeypatch):
    with pytest.raises(ConfigError, match="unknown job kind 'sing'"):
        get_job("sing")
    monkeypatch.setenv("KYARA_JOB_MODULES", "train")
    with pytest.raises(ConfigError, match="KYARA_JOB_MODULES: expected kind=module"):
        get_job("train")


def test_the_hook_maps_a_kind_to_a_module(fake_jobs, job_file, ctx):
    cfg = load_job(job_file("fast"))
    events = list(get_job("train").run(cfg, ctx))
    assert events[-1].type == "done" and events[-1].summary["steps"] == 3


def test_index_job_says_when_it_builds_the_embedder(configs, ctx, monkeypatch):
    import pipelines.retrieval.e5onnx as e5onnx

    monkeypatch.setattr(e5onnx, "is_built", lambda home=None: False)  # as on a first run
    cfg = load_job(configs / "jobs" / "index-tiny.yaml")
    events = list(get_job("index").run(cfg, ctx))
    logs = [e.message for e in events if e.type == "log"]
    assert any("building the e5-onnx embedder" in m for m in logs), logs
    assert events[-1].type == "done"
