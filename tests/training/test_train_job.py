"""The train job end to end on tiny random models: events, adapter, registered variant,
mini-evaluation; and the refusals (QLoRA on CPU, a run that will not fit, bad labels)."""

from __future__ import annotations

import json

import pytest

from pipelines.config import ConfigError, HFVariant, parse_job
from pipelines.jobs import JobContext, get_job
from pipelines.variants import variant_row_id
from pipelines.workspace import Workspace
from tests.training.conftest import train_job


def run_job(configs, tmp_path, **changes):
    ws = Workspace.load(configs)
    cfg = parse_job(train_job(**changes), "test")
    ctx = JobContext.create(ws, tmp_path / "run")
    return list(get_job("train").run(cfg, ctx)), ctx, ws


def test_gemma_job_end_to_end(train_configs, tmp_path):
    events, ctx, ws = run_job(train_configs, tmp_path, variant="tiny-gemma-ayane")
    kinds = [e.type for e in events]
    assert kinds[0] == "start" and kinds[-1] == "done"
    stages = [e.stage for e in events if e.type == "stage"]
    assert stages == ["data", "model", "memory", "load", "train", "save", "eval"]
    steps = [e.current for e in events if e.type == "progress"]
    assert steps[0] == 0 and steps[-1] == 3 and steps == sorted(steps)
    metrics = {e.name for e in events if e.type == "metric"}
    assert {"loss", "eval_loss", "learning_rate", "tokens_per_s", "eta_s", "epoch",
            "peak_rss_gb", "memory_estimate_gb"} <= metrics
    summary = events[-1].summary
    out = ctx.home / "runs" / "tiny-train"
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert not list(out.glob(".adapter*"))  # the temporary folder was renamed
    assert "job: train" in (out / "config.yaml").read_text(encoding="utf-8")
    assert (out / "checkpoints" / "checkpoint-2" / "kyara-complete.json").is_file()
    # registered: store row + YAML the workspace lists
    row = ctx.store.get("variants", variant_row_id("tiny-gemma-ayane"))
    assert row["base"] == "tiny-gemma" and row["adapter"] == str((out / "adapter").resolve())
    assert row["source_run_id"] == ctx.run_id
    variant = Workspace.load(train_configs).variant("tiny-gemma-ayane")
    assert isinstance(variant, HFVariant) and variant.adapter == row["adapter"]
    # mini-evaluation: both sides, stored with the run summary and in eval.json
    mini = summary["mini_eval"]
    assert mini["before"]["variant"] == "tiny-gemma" and mini["after"]["n"] == 3
    assert "replies ending with 。" in mini["table"]
    assert "judge skipped" in mini["table"]
    saved = json.loads((out / "eval.json").read_text(encoding="utf-8"))
    assert len(saved["replies"]) == 3
    assert summary["steps"] == 3 and summary["tokens_per_s"] > 0


def test_trained_variant_loads_in_the_hf_backend(train_configs, tmp_path):
    events, ctx, ws = run_job(train_configs, tmp_path, variant="tiny-gemma-chat",
                              eval_questions=0)
    assert events[-1].type == "done" and "mini_eval" not in events[-1].summary
    from pipelines.inference.base import GenerationOptions
    from pipelines.inference.registry import load_backend

    backend = load_backend(Workspace.load(train_configs).variant("tiny-gemma-chat"), ctx.home)
    try:
        deltas = list(backend.stream([{"role": "user", "content": "お名前は？"}],
                                     GenerationOptions(max_new_tokens=4, temperature=0)))
        assert deltas[-1].done and deltas[-1].completion_tokens >= 1
    finally:
        backend.close()


def test_llama_job_trains_eos(train_configs, tmp_path):
    events, ctx, _ = run_job(train_configs, tmp_path, base="tiny-llama", eval_questions=1,
                             eval_fraction=0.0)
    assert events[-1].type == "done", events[-1]
    logs = " ".join(e.message or "" for e in events if e.type == "log")
    assert "the turn terminator <eos> is trained" in logs


def test_qlora_on_cpu_is_refused(train_configs, tmp_path):
    with pytest.raises(ConfigError, match="QLoRA .* needs a CUDA GPU"):
        run_job(train_configs, tmp_path, qlora=True)


def test_run_that_will_not_fit_is_refused_with_a_setting_that_fits(train_configs, tmp_path,
                                                                  monkeypatch):
    from pipelines.training import memory

    real = memory.detect_device

    def small() -> memory.Device:
        found = real()
        return memory.Device(found.kind, "a small device", 2.5 * 1024 ** 3, 3 * 1024 ** 3)

    monkeypatch.setattr(memory, "detect_device", small)
    with pytest.raises(ConfigError) as caught:
        run_job(train_configs, tmp_path, batch_size=256, max_seq_len=256)
    message = str(caught.value)
    assert "would not fit" in message and "GiB" in message and "activations" in message
    assert "try batch_size:" in message and "\n" not in message


def test_terminator_cut_by_max_seq_len_is_refused_with_the_view(train_configs, tmp_path):
    ws = Workspace.load(train_configs)
    cfg = parse_job(train_job(max_seq_len=60), "test")
    ctx = JobContext.create(ws, tmp_path / "run")
    seen = []
    with pytest.raises(ConfigError) as caught:
        for event in get_job("train").run(cfg, ctx):
            seen.append(event)
    assert "turn terminator" in str(caught.value) or "no token is trained" in str(caught.value)
    views = [e.message for e in seen if e.type == "log" and e.level == "error"]
    assert views and "TRAINED" in views[0] or "masked" in views[0]
    assert (ctx.home / "runs" / "tiny-train" / "labels.txt").is_file()
