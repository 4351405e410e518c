"""The train job's stages called one by one, outside `run`: the data stage, the tokenising
stage on the tiny Gemma, and the one label check that guards both the tokenised examples
and the trainer's collated batch."""

from __future__ import annotations

import json

import pytest

from pipelines.config import ConfigError, parse_job
from pipelines.jobs import JobContext
from pipelines.jobs import train as job
from pipelines.training.examples import IGNORE, LabelError
from pipelines.workspace import Workspace
from tests.training.conftest import DIALOGUES, train_job


def drain(stage):
    """A stage's events and what it returns for the next one."""
    events = []
    while True:
        try:
            events.append(next(stage))
        except StopIteration as stop:
            return events, stop.value


def setup(configs, tmp_path, **changes):
    ws = Workspace.load(configs)
    cfg = parse_job(train_job(**changes), "test")
    ctx = JobContext.create(ws, tmp_path / "run")
    out = job.output_dir(cfg, ctx.home)
    out.mkdir(parents=True)
    return cfg, ctx, ws, out


def test_data_stage_prepares_writes_and_returns_the_rows(train_configs, tmp_path):
    cfg, ctx, _, out = setup(train_configs, tmp_path)
    summary: dict = {}
    events, rows = drain(job.prepare_data(cfg, ctx, out, summary))
    assert [(e.type, e.stage) for e in events if e.type == "stage"] == [("stage", "data")]
    assert any(e.type == "log" and e.message.startswith("data preparation:\n") for e in events)
    metrics = {e.name: e.value for e in events if e.type == "metric"}
    assert metrics["conversations"] == len(rows) == len(DIALOGUES)
    written = (out / "data.prepared.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in written] == rows
    assert summary["source"].endswith("dialogues.jsonl") and "prep" in summary


def test_tokenise_stage_alone_on_the_tiny_gemma(train_configs, tmp_path):
    cfg, ctx, ws, out = setup(train_configs, tmp_path)
    base = job.base_variant(ctx, cfg)
    events, data = drain(job.tokenise(cfg, ctx, base, ws.persona("ayane"), DIALOGUES, out))
    assert events[0].type == "stage" and events[0].stage == "model"
    assert len(data.examples) == len(DIALOGUES)
    assert sorted(data.train_idx + data.eval_idx) == list(range(len(DIALOGUES)))
    assert len(data.eval_idx) == round(len(DIALOGUES) * cfg.eval_fraction)
    assert events[-1].message == (f"{len(data.train_idx)} training and {len(data.eval_idx)} "
                                  f"eval examples; the turn terminator {data.end_text} is "
                                  "trained in every one")
    for example in data.examples:  # the reply and its terminator are trained, the prompt not
        assert data.end_id in [t for t, x in zip(example.input_ids, example.labels,
                                                 strict=True) if x != IGNORE]
        assert example.labels[:example.prompt_tokens] == [IGNORE] * example.prompt_tokens
    assert data.rows(data.eval_idx) == [data.examples[i].as_row() for i in data.eval_idx]
    assert not (out / job.LABELS_FILE).exists()


def test_tokenise_stage_refuses_a_cut_terminator_with_the_view(train_configs, tmp_path):
    cfg, ctx, ws, out = setup(train_configs, tmp_path, max_seq_len=60)
    base = job.base_variant(ctx, cfg)
    seen = []
    with pytest.raises(LabelError) as caught:
        for event in job.tokenise(cfg, ctx, base, ws.persona("ayane"), DIALOGUES, out):
            seen.append(event)
    errors = [e for e in seen if e.type == "log" and e.level == "error"]
    assert len(errors) == 1
    assert errors[0].message.startswith("example 0 as the model sees it (also in ")
    assert str(caught.value).startswith(f"example 0 ({DIALOGUES[0]['id']}): ")
    assert (out / job.LABELS_FILE).read_text(encoding="utf-8") == caught.value.view + "\n"


def test_one_label_check_for_examples_and_collated_rows(train_configs, tmp_path):
    """The same function answers for a good row (no event) and a bad one (the view in
    labels.txt and one error event under the heading, then a ConfigError naming `where`)."""
    cfg, ctx, ws, out = setup(train_configs, tmp_path)
    base = job.base_variant(ctx, cfg)
    _, data = drain(job.tokenise(cfg, ctx, base, ws.persona("ayane"), DIALOGUES, out))
    good = data.examples[0]
    assert list(job.check_example_labels(data.tokenizer, good.input_ids, good.labels,
                                         data.end_id, out, heading="h:\n", where="w: ")) == []
    masked = [IGNORE] * len(good.labels)  # nothing trained: the model would never stop
    seen = []
    with pytest.raises(ConfigError) as caught:
        for event in job.check_example_labels(data.tokenizer, good.input_ids, masked,
                                              data.end_id, out,
                                              heading="a collated example as the model sees "
                                                      "it:\n", where="collator: "):
            seen.append(event)
    assert str(caught.value).startswith("collator: ")
    assert [e.level for e in seen] == ["error"]
    view = (out / job.LABELS_FILE).read_text(encoding="utf-8").rstrip("\n")
    assert seen[0].message == "a collated example as the model sees it:\n" + view


def test_importing_the_job_leaves_the_environment_alone(monkeypatch):
    """OMP_WAIT_POLICY is set when a train run starts (its own process), not by importing
    the module; a value the user set is kept."""
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    probe = ("import os, pipelines.jobs.train as t; print(os.environ.get('OMP_WAIT_POLICY')); "
             "t.passive_openmp(); print(os.environ.get('OMP_WAIT_POLICY'))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=env, check=True,
                         capture_output=True, text=True).stdout.split()
    assert out == ["None", "PASSIVE"]
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    job.passive_openmp()
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
