"""The evolve job on three tiny Llama models on CPU: in-memory merges equal mergekit's,
genomes decode to valid mergekit configs, a two-generation search with a scripted judge
(over real HTTP) improves its fitness and writes a loadable config, stored evaluations are
replayed (not recomputed), a failed verdict is never a score of 0, and the planner, bad
models and a missing Ray extra are refused in one line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from pipelines.config import ConfigError, EvolveJob, MergeOptions
from pipelines.merge.evolve import SearchSpace, resolve_sources
from pipelines.merge.inmemory import InMemoryMerger, SourceIndex
from pipelines.merge.merge import run_merge, validate_merge_config
from pipelines.workspace import Workspace
from tests.judge.scripted_judge_server import Reply, ScriptedServer
from tests.merge.evolve_job import (
    KEY_ENV,
    job_dict,
    kill_after_evaluations,
    records,
    run_job,
    start_job,
    write_configs,
)
from tests.merge.models import make_model

# --- merge math -------------------------------------------------------------------------


def resident(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


def mergekit_tensors(config: dict, out: Path) -> dict[str, torch.Tensor]:
    run_merge(validate_merge_config(config), out, MergeOptions(device="cpu"))
    merged: dict[str, torch.Tensor] = {}
    for file in out.glob("*.safetensors"):
        merged.update(load_file(str(file)))
    return merged


@pytest.mark.parametrize("method,chunk", [
    ("linear", None), ("linear", 1000), ("task_arithmetic", 1000), ("ties", None),
    ("ties", 1000), ("ties-per-layer", 1000)])
def test_in_memory_merge_equals_mergekit(tiny_models, tmp_path, monkeypatch, method, chunk):
    from pipelines.merge import inmemory

    if chunk is not None:  # element-wise methods merge big tensors in row chunks
        monkeypatch.setattr(inmemory, "MERGE_CHUNK_ELEMENTS", chunk)
    base, *others = (str(m) for m in tiny_models)
    if method == "linear":
        config = {"merge_method": "linear", "dtype": "float32", "models": [
            {"model": m, "parameters": {"weight": w}}
            for m, w in zip([base, *others], [0.5, 0.3, 0.2], strict=True)]}
    else:
        params = ({"weight": 0.6} if method == "task_arithmetic" else
                  {"weight": 0.7, "density": 0.5} if method == "ties" else
                  {"weight": [0.1, 0.9], "density": [0.3, 0.8]})
        config = {"merge_method": method.removesuffix("-per-layer"), "base_model": base,
                  "dtype": "float32",
                  "models": [{"model": m, "parameters": params} for m in others]}
    model = resident(tiny_models[0])
    pointers = {n: p.data_ptr() for n, p in model.named_parameters()}
    merger = InMemoryMerger(model, {m: SourceIndex(m) for m in tiny_models})
    sparse_calls = []
    original = merger._sparse_into
    monkeypatch.setattr(merger, "_sparse_into",
                        lambda *a: sparse_calls.append(a[0].name) or original(*a))
    merger.apply(validate_merge_config(config))
    # ties on big tensors takes the two-pass path (the chunk makes every matrix "big")
    assert bool(sparse_calls) == (method.startswith("ties") and chunk is not None)

    expected = mergekit_tensors(config, tmp_path / "mk")
    state = model.state_dict()
    assert set(expected) == set(state)
    for name, value in expected.items():
        torch.testing.assert_close(state[name], value, rtol=0, atol=1e-6, msg=name)
    # written in place: the same storage, no second model
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == pointers
    if method == "linear":  # and it is the weighted mean, numerically
        srcs = [load_file(str(m / "model.safetensors")) for m in tiny_models]
        name = "model.layers.1.self_attn.q_proj.weight"
        mean = sum(w * s[name] for w, s in zip([0.5, 0.3, 0.2], srcs, strict=True))
        torch.testing.assert_close(state[name], mean, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk", [None, 1000])
def test_dare_ties_is_seeded_and_keeps_its_density(tiny_models, monkeypatch, chunk):
    from pipelines.merge import inmemory

    if chunk is not None:  # big tensors: kyara's two-pass path instead of mergekit's
        monkeypatch.setattr(inmemory, "MERGE_CHUNK_ELEMENTS", chunk)
    base, other = str(tiny_models[0]), str(tiny_models[1])
    config = validate_merge_config({
        "merge_method": "dare_ties", "base_model": base, "dtype": "float32",
        "models": [{"model": other, "parameters": {"weight": 1.0, "density": 0.4}}]})
    model = resident(tiny_models[0])
    merger = InMemoryMerger(model, {m: SourceIndex(m) for m in tiny_models[:2]})
    name = "model.layers.0.mlp.up_proj.weight"

    def merged(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        merger.apply(config)
        return model.state_dict()[name].clone()

    a, b, c = merged(1), merged(1), merged(2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    base_t = load_file(str(tiny_models[0] / "model.safetensors"))[name]
    delta = load_file(str(tiny_models[1] / "model.safetensors"))[name] - base_t
    got = a - base_t
    kept = got.abs() > 1e-9
    assert 0.3 < kept.float().mean().item() < 0.5  # ~ density 0.4 of the entries survive
    # the survivors are the task vector's entries, all rescaled by one factor (mergekit
    # matches the L1 norm of the task vector: about 1 / density)
    ratio = got[kept] / delta[kept]
    torch.testing.assert_close(ratio, torch.full_like(ratio, ratio[0].item()), rtol=1e-3,
                               atol=1e-3)
    assert 2.0 < ratio[0].item() < 3.2


@pytest.mark.parametrize("method,groups", [("linear", 1), ("task_arithmetic", 1),
                                           ("ties", 2), ("dare_ties", 3)])
def test_genomes_decode_to_valid_mergekit_configs(tiny_models, method, groups):
    base, *others = (str(m) for m in tiny_models)
    cfg = EvolveJob(job="evolve", name="g", method=method, models=others,
                    base_model=None if method == "linear" else base, layer_groups=groups,
                    options={"device": "cpu"})
    space = SearchSpace.build(cfg, *resolve_sources(cfg, None), "float32")
    per_model = (2 if method in ("ties", "dare_ties") else 1) * groups
    assert len(space.variables) == per_model * len(space.inputs)
    wild = [5.0 if i % 2 else -3.0 for i in range(len(space.variables))]  # out of bounds
    config = space.decode(wild)
    validate_merge_config(config)
    for entry in config["models"]:
        for kind, value in entry["parameters"].items():
            values = value if isinstance(value, list) else [value]
            assert len(values) == groups
            low = 0.1 if kind == "density" else (0.01 if method == "linear" else 0.0)
            assert all(low <= v <= 1.0 for v in values), (kind, values)


# --- the job ----------------------------------------------------------------------------


def test_evolve_improves_and_writes_a_loadable_config(models, configs, judge_server,
                                                      tmp_path):
    from mergekit.config import MergeConfiguration

    search = tmp_path / "search"
    events = run_job(configs, tmp_path / "run", job_dict(models, search))
    assert events[-1].type == "done", events[-1]
    stages = [e.stage for e in events if e.type == "stage"]
    assert stages[:4] == ["validate", "plan", "load", "evaluate"] and stages[-1] == "write"

    fitness = [e.value for e in events if e.type == "metric" and e.name == "fitness"]
    best = [e.value for e in events if e.type == "metric" and e.name == "best_fitness"]
    assert len(fitness) == 8 and len(best) == 8
    assert best == sorted(best)  # the best-so-far curve never goes down
    first_generation = sum(fitness[:4]) / 4
    assert best[-1] > first_generation + 0.05, (fitness, best)
    assert best[-1] > max(fitness[:1])

    stored = records(search)
    assert [r["index"] for r in stored] == list(range(8))
    assert all(r["status"] == "ok" and r["criteria"]["personality"] >= 1 for r in stored)
    assert all(len(r["samples"]) == 2 and "reply" in r["samples"][0] for r in stored)
    summary = events[-1].summary
    top = max(stored, key=lambda r: r["fitness"])
    assert summary["best_fitness"] == top["fitness"] and summary["evaluated"] == 8
    # the search moved weight onto model 0, the one the judge rewards
    weights = [m["parameters"]["weight"] for m in top["merge"]["models"]]
    assert weights[0] / sum(weights) > 1 / 3

    for place in (search, tmp_path / "run"):
        text = (place / "best_merge.yaml").read_text(encoding="utf-8")
        loaded = MergeConfiguration.model_validate(yaml.safe_load(text))
        assert loaded.merge_method == "linear"
        assert [float(m.parameters["weight"]) for m in loaded.models] == weights
    assert judge_server.count >= 8  # scored over HTTP (identical replies are cached)

    # the same job again: every evaluation is replayed, none computed, same result
    before = judge_server.count
    again = run_job(configs, tmp_path / "run2", job_dict(models, search))
    assert again[-1].type == "done", again[-1]
    assert again[-1].summary["replayed"] == 8 and again[-1].summary["evaluated"] == 0
    assert again[-1].summary["best_fitness"] == summary["best_fitness"]
    assert judge_server.count == before and len(records(search)) == 8


def test_failed_verdicts_fail_the_evaluation_not_score_zero(models, tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-test")
    with ScriptedServer(lambda request: Reply(status=500)) as server:
        configs = write_configs(tmp_path / "configs", server.base_url, max_retries=0)
        events = run_job(configs, tmp_path / "run", job_dict(
            models, tmp_path / "search", population=2, generations=1, questions_limit=2))
    assert events[-1].type == "error" and events[-1].kind == "no_result", events[-1]
    assert not [e for e in events if e.type == "metric" and e.name == "fitness"]
    stored = records(tmp_path / "search")
    assert len(stored) == 2
    for record in stored:
        assert record["status"] == "failed" and record["fitness"] is None
        assert "not ok" in record["error"] and record["verdicts"]["failed"] == 2
    assert any(e.type == "log" and e.level == "warning" and "failed" in e.message
               for e in events)


def test_refuses_when_the_plan_does_not_fit(models, configs, tmp_path, monkeypatch):
    from pipelines.plan import budget as planner

    monkeypatch.setattr(planner, "_available_ram", lambda: 50 * planner.MiB)
    events = run_job(configs, tmp_path / "run", job_dict(models, tmp_path / "search"))
    assert events[-1].type == "error" and events[-1].kind == "memory"
    assert "does not fit" in events[-1].message and "runtime" in events[-1].message
    assert not (tmp_path / "search" / "evaluations.jsonl").exists()

    monkeypatch.undo()
    monkeypatch.setenv(KEY_ENV, "sk-test")
    monkeypatch.setattr(planner, "detect_budget",
                        lambda *a, **k: planner.Budget(gpu=None, host=64 * planner.GiB,
                                                       source="given"))
    events = run_job(configs, tmp_path / "run2", job_dict(
        models, tmp_path / "search", options={"device": "cuda"}))
    assert events[-1].kind == "memory" and "needs a GPU" in events[-1].message


def test_bad_input_is_one_line(models, configs, tmp_path):
    def refused(**changes) -> str:
        with pytest.raises(ConfigError) as info:
            run_job(configs, tmp_path / "run", {**job_dict(models, tmp_path / "s"), **changes})
        assert "\n" not in str(info.value)
        return str(info.value)

    assert "not a local folder" in refused(models=[str(models[0]), str(tmp_path / "nope")])
    other = make_model(tmp_path / "wide", seed=5, hidden=32, intermediate=64)
    assert "mismatched architectures" in refused(models=[str(models[0]), str(other)])
    assert "needs a base model" in refused(method="ties")
    assert "is the base model" in refused(method="ties", base_model=str(models[0]))
    # a finished search's folder is not reused by a different search
    run_job_folder = tmp_path / "s"
    assert not run_job_folder.exists()  # the refusals above wrote nothing
    run_job_folder.mkdir()
    (run_job_folder / "search.json").write_text(json.dumps({"seed": 99}), encoding="utf-8")
    assert "holds another search" in refused()


def test_ray_without_the_extra_is_refused_in_one_line(models, configs, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails, installed or not
    with pytest.raises(ConfigError, match=r"kyara\[ray\]") as info:
        run_job(configs, tmp_path / "run", job_dict(models, tmp_path / "s", ray=True))
    assert "\n" not in str(info.value)
    assert not (tmp_path / "s").exists()  # refused before anything was written


def test_ray_address_without_ray_is_refused(models, tmp_path):
    with pytest.raises(ValueError, match="ray_address: set, but ray is false"):
        EvolveJob.model_validate(job_dict(models, tmp_path / "s", ray_address="127.0.0.1:1"))


def test_capability_check_is_a_fitness_term(models, configs, tmp_path):
    questions = tmp_path / "capability.jsonl"
    questions.write_text("\n".join(json.dumps(row, ensure_ascii=False) for row in [
        {"question": "印を書いて。", "expected": ["わ"]},
        {"question": "もう一度。", "expected": "わ"},
        {"question": "英語で挨拶して。", "expected": ["hello-never-produced"]},
    ]) + "\n", encoding="utf-8")
    events = run_job(configs, tmp_path / "run", job_dict(
        models, tmp_path / "search", population=4, generations=1, capability=str(questions),
        fitness={"judge": 0.0, "style": 0.0, "capability": 1.0}))
    assert events[-1].type == "done", events[-1]
    stored = records(tmp_path / "search")
    values = [r["terms"]["capability"] for r in stored]
    assert all(abs(r["fitness"] - r["terms"]["capability"]) < 1e-6 for r in stored)
    assert all(min(abs(v - n / 3) for n in range(3)) < 1e-6 for v in values), values
    assert max(values) < 1  # the third answer is never found
    assert all(r["verdicts"] == {"ok": 0, "invalid": 0, "failed": 0} for r in stored)


# --- resume after SIGKILL, and materialisation (slow: two job processes) ------------------


@pytest.mark.slow
def test_resume_after_sigkill_repeats_nothing_and_matches_an_uninterrupted_run(
        models, configs, tmp_path):
    import signal

    from pipelines.events import iter_events

    search = tmp_path / "search"
    data = job_dict(models, search, generations=3, name="evo-resume")
    cfg_path = tmp_path / "evolve.yaml"
    cfg_path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")

    first = start_job(cfg_path, tmp_path / "run1", configs)
    log = search / "evaluations.jsonl"
    kill_after_evaluations(first, log)
    assert first.returncode == -signal.SIGKILL
    kept = log.read_bytes().count(b"\n")
    assert 3 <= kept < 12

    second = start_job(cfg_path, tmp_path / "run2", configs)
    assert second.wait(timeout=300) == 0
    events = list(iter_events(tmp_path / "run2" / "events.jsonl"))
    assert events[-1].type == "done", events[-1]
    summary = events[-1].summary
    assert summary["replayed"] == kept and summary["evaluated"] == 12 - kept
    resumed = records(search)
    assert [r["index"] for r in resumed] == list(range(12))  # none repeated, none missing

    # the same search without a kill, in this process, materialised at the end
    whole = run_job(configs, tmp_path / "run3",
                    {**job_dict(models, tmp_path / "whole", generations=3, name="evo-resume"),
                     "materialize": True})
    assert whole[-1].type == "done", whole[-1]
    uninterrupted = records(tmp_path / "whole")
    for a, b in zip(resumed, uninterrupted, strict=True):
        assert a["genome"] == b["genome"] and a["fitness"] == b["fitness"], a["index"]
    assert whole[-1].summary["best_fitness"] == summary["best_fitness"]

    # the materialised model is mergekit's merge of the best config, registered as a variant
    best = max(uninterrupted, key=lambda r: (r["fitness"], -r["index"]))
    out = Path(whole[-1].summary["output"])
    on_disk = load_file(str(next(out.glob("*.safetensors"))))
    model = resident(models[0])
    InMemoryMerger(model, {m: SourceIndex(m) for m in models}).apply(
        validate_merge_config(best["merge"]))
    for name, value in model.state_dict().items():
        torch.testing.assert_close(on_disk[name], value, rtol=0, atol=1e-6, msg=name)
    workspace = Workspace.load(configs)
    assert Path(workspace.variant("evo-resume").model) == out
