"""The merge job on three tiny random models on CPU: linear is the weighted mean tensor by
tensor; slerp, ties and task_arithmetic produce loadable models; refusals are one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipelines.config import ConfigError, MergeJob
from pipelines.jobs import JobContext, get_job
from pipelines.merge.merge import validate_merge_config


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out


def run_job(workspace, tmp_path, merge: dict, name: str = "merged", **extra) -> list:
    cfg = MergeJob(job="merge", name=name, merge=merge, output=str(tmp_path / name), **extra)
    ctx = JobContext.create(workspace, tmp_path / "run")
    return list(get_job("merge").run(cfg, ctx))


def test_linear_is_the_weighted_mean(workspace, tmp_path, tiny_models):
    weights = [0.5, 0.3, 0.2]
    merge = {"merge_method": "linear", "dtype": "float32",
             "parameters": {"normalize": False},
             "models": [{"model": str(m), "parameters": {"weight": w}}
                        for m, w in zip(tiny_models, weights, strict=True)]}
    events = run_job(workspace, tmp_path, merge, options={"out_shard_size": "100KiB"})
    assert events[-1].type == "done", events[-1]
    stages = [e.stage for e in events if e.type == "stage"]
    assert stages == ["validate", "plan", "merge", "register"]
    progress = [e for e in events if e.type == "progress"]
    assert progress and progress[-1].current == progress[-1].total

    out = Path(events[-1].summary["output"])
    merged = tensors(out)
    sources = [tensors(m) for m in tiny_models]
    assert set(merged) == set(sources[0])
    for name, value in merged.items():
        expected = sum(w * s[name] for w, s in zip(weights, sources, strict=True))
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6, msg=name)
    assert len(list(out.glob("*.safetensors"))) > 1  # the small shard size was honoured
    assert (out / "kyara_merge.yaml").is_file() and (out / "mergekit_config.yml").is_file()
    assert not list(tmp_path.glob(".merged.tmp-*"))  # renamed, nothing left behind

    # registered: the workspace lists it, the store has its row
    variant = workspace.variant("merged")
    assert variant.backend == "hf" and Path(variant.model) == out
    rows = JobContext.create(workspace, tmp_path / "run").store.count("variants")
    assert rows == 1


@pytest.mark.parametrize("method,params", [
    ("slerp", {"t": 0.3}),
    ("ties", {"density": 0.5, "weight": 0.5}),
    ("task_arithmetic", {"weight": 0.5}),
])
def test_other_methods_give_loadable_models(workspace, tmp_path, tiny_models, method, params):
    from transformers import AutoModelForCausalLM

    base, *others = tiny_models
    if method == "slerp":
        merge = {"merge_method": "slerp", "base_model": str(base), "dtype": "float32",
                 "slices": [{"sources": [{"model": str(m), "layer_range": [0, 2]}
                                         for m in tiny_models[:2]]}],
                 "parameters": params}
    else:
        merge = {"merge_method": method, "base_model": str(base), "dtype": "float32",
                 "models": [{"model": str(m), "parameters": params} for m in others]}
    events = run_job(workspace, tmp_path, merge, name=method.replace("_", "-"))
    assert events[-1].type == "done", events[-1]
    out = Path(events[-1].summary["output"])
    model = AutoModelForCausalLM.from_pretrained(out)
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, 512) and torch.isfinite(logits).all()

    merged, b = tensors(out), tensors(base)
    name = "model.layers.0.mlp.down_proj.weight"
    if method == "task_arithmetic":  # base + sum of w * (model - base)
        o = [tensors(m) for m in others]
        expected = b[name] + sum(0.5 * (x[name] - b[name]) for x in o)
        torch.testing.assert_close(merged[name], expected, rtol=1e-5, atol=1e-6)
    elif method == "ties":  # density 0.5: each task vector keeps half its entries
        delta = merged[name] - b[name]
        assert 0 < (delta == 0).float().mean() < 0.9
    else:  # slerp t=0.3 lies between its ends, nearer the base
        m1 = tensors(tiny_models[1])[name]
        assert (merged[name] - b[name]).norm() < (merged[name] - m1).norm()


def test_refuses_a_non_empty_output(workspace, tmp_path, tiny_models):
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "keep.txt").write_text("mine")
    merge = {"merge_method": "linear",
             "models": [{"model": str(m), "parameters": {"weight": 1}} for m in tiny_models]}
    with pytest.raises(ConfigError, match="not empty"):
        run_job(workspace, tmp_path, merge)
    assert (tmp_path / "merged" / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("merge,key", [
    ({"merge_method": "linear", "models": [{"modle": "x"}]}, "merge.models"),
    ({"merge_method": "nonsense", "models": [{"model": "x"}]}, "merge.merge_method"),
    ({"models": [{"model": "x"}]}, "merge.merge_method"),
    ({"merge_method": "linear"}, "merge"),
])
def test_bad_merge_config_is_one_line(merge, key):
    with pytest.raises(ConfigError) as info:
        validate_merge_config(merge, "merge")
    message = str(info.value)
    assert "\n" not in message and message.startswith(key), message


def test_refuses_when_the_plan_does_not_fit(workspace, tmp_path, tiny_models, monkeypatch):
    from pipelines.plan import budget as planner

    monkeypatch.setattr(planner, "_available_ram", lambda: 50 * planner.MiB)
    merge = {"merge_method": "linear",
             "models": [{"model": str(m), "parameters": {"weight": 1}} for m in tiny_models]}
    events = run_job(workspace, tmp_path, merge)
    assert events[-1].type == "error" and events[-1].kind == "memory"
    assert "does not fit" in events[-1].message and "runtime" in events[-1].message
    assert not (tmp_path / "merged").exists()
