"""The memory planner: header reading, budgets and verdicts, `kyara plan`, and the
prediction against the measured peak RSS of a real CPU merge in a subprocess."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipelines.config import ConfigError, MergeOptions, TrainJob
from pipelines.plan import (
    Budget,
    GiB,
    MiB,
    inspect_model,
    parse_size,
    plan_generate,
    plan_merge,
    plan_train,
)
from tests.conftest import REPO, run_kyara


def linear(models: list[Path]) -> dict:
    return {"merge_method": "linear",
            "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in models]}


def test_parse_size():
    assert parse_size("24GiB") == 24 * GiB
    assert parse_size("500MB") == 500_000_000
    assert parse_size("5B") == 5_000_000_000  # mergekit's notation
    assert parse_size("100MiB") == 100 * MiB
    with pytest.raises(ConfigError):
        parse_size("lots")


def test_inspect_reads_headers_not_weights(tiny_models):
    import torch
    from safetensors.torch import load_file

    stats = inspect_model(tiny_models[0])
    tensors = load_file(str(tiny_models[0] / "model.safetensors"))
    assert stats.params == sum(t.numel() for t in tensors.values())
    assert stats.bytes == sum(t.numel() * t.element_size() for t in tensors.values())
    assert stats.dtype_bytes == 4 and all(t.dtype == torch.float32 for t in tensors.values())
    assert (stats.layers, stats.kv_heads, stats.head_dim, stats.vocab) == (2, 2, 16, 512)


def header_only_model(path: Path, shapes: dict[str, list[int]]) -> Path:
    """A 'model' whose safetensors file is a header plus a sparse hole: the planner must
    not need the weights (this one would be GBs of zeros if it read them)."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = 2
        for dim in shape:
            size *= dim
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    path.mkdir(parents=True)
    with open(path / "model.safetensors", "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        fh.truncate(8 + len(raw) + offset)
    (path / "config.json").write_text(json.dumps({"num_hidden_layers": 28, "hidden_size": 3584}))
    return path


def test_merge_plan_names_the_buffer_and_a_shard_size_that_fits(tmp_path):
    shapes = {f"layer{i}.weight": [3584, 18944] for i in range(60)}
    models = [header_only_model(tmp_path / f"m{i}", shapes) for i in range(3)]
    plan = plan_merge(linear(models), MergeOptions(out_shard_size="5B"))
    assert inspect_model(models[0]).params == 60 * 3584 * 18944
    buffer = next(t for t in plan.host if t.name == "output shard buffer")
    plan.budget = Budget(gpu=None, host=plan.host_peak - buffer.bytes // 2, source="given")
    assert not plan.fits
    verdict = plan.verdict()
    assert "output shard buffer" in verdict and "out_shard_size" in verdict
    assert "\n" not in verdict


def test_cuda_merge_without_gpu_suggests_cpu(tiny_models):
    plan = plan_merge(linear(tiny_models), MergeOptions(device="cuda"))
    plan.budget = Budget(gpu=None, host=64 * GiB, source="given")
    assert not plan.fits and "device: cpu" in plan.verdict()


def test_kv_cache_term(tiny_models):
    plan = plan_generate(str(tiny_models[0]), name="t", device="cuda", max_new_tokens=1024 + 0,
                         dtype="float16", batch=4)
    kv = next(t for t in plan.gpu if t.name == "KV cache")
    # layers x 2 x kv_heads x head_dim x context x batch x bytes
    assert kv.bytes == 2 * 2 * 2 * 16 * (1024 + 1024) * 4 * 2


def test_train_plan_counts_adamw_state_and_suggests_a_smaller_batch(tiny_models):
    cfg = TrainJob(job="train", name="t", base="x", batch_size=64, max_seq_len=2048)
    plan = plan_train(cfg, str(tiny_models[0]), device="cuda")
    lora = next(t for t in plan.gpu if t.name == "LoRA + AdamW state")
    # all-linear, r=16 on 2 layers: q(64->64) k,v(64->32) o(64->64) gate,up(64->128) down
    per_layer = 16 * ((64 + 64) + 2 * (64 + 32) + (64 + 64) + 2 * (64 + 128) + (128 + 64))
    assert lora.bytes == 2 * per_layer * 16
    plan.budget = Budget(gpu=plan.gpu_peak // 3, host=64 * GiB, source="given")
    assert not plan.fits and "batch_size 1" in plan.verdict()


def test_kyara_plan_cli(tiny_models, tmp_path):
    job = tmp_path / "merge.yaml"
    job.write_text(yaml.safe_dump({"job": "merge", "name": "m", "merge": linear(tiny_models)},
                                  sort_keys=False))
    fits = run_kyara("plan", str(job), "--ram", "64GiB")
    assert fits.returncode == 0, fits.stderr
    assert "output shard buffer" in fits.stdout and "fits" in fits.stdout
    tight = run_kyara("plan", str(job), "--ram", "10MiB")
    assert tight.returncode == 1 and "does not fit" in tight.stdout
    missing = tmp_path / "missing.yaml"
    missing.write_text(yaml.safe_dump({"job": "merge", "name": "m",
                                       "merge": linear([tmp_path / "nowhere"])}))
    bad = run_kyara("plan", str(missing))
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


def measured_peak(out: Path, shard: str, models: list[Path]) -> int:
    child = subprocess.run(
        [sys.executable, str(REPO / "tests" / "merge" / "rss_child.py"), str(out), shard,
         *map(str, models)], check=False, capture_output=True, text=True, cwd=REPO, timeout=600,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert child.returncode == 0, child.stderr[-2000:]
    return int(child.stdout.strip().splitlines()[-1])


def test_prediction_within_25_percent_tiny(tiny_models, tmp_path):
    predicted = plan_merge(linear(tiny_models), MergeOptions(out_shard_size="1GiB")).host_peak
    measured = measured_peak(tmp_path / "out", "1GiB", tiny_models)
    print(f"tiny: predicted {predicted / MiB:.0f} MiB, measured {measured / MiB:.0f} MiB")
    assert abs(predicted - measured) <= 0.25 * measured


@pytest.mark.slow
@pytest.mark.parametrize("shard", ["1GiB", "100MiB"])
def test_prediction_within_25_percent_medium(tmp_path, shard):
    from tests.merge.models import make_model_fast

    root = tmp_path  # 1.9 GB, removed when the test passes
    models = [make_model_fast(root / f"m{i}", i, hidden=1024, layers=20, vocab=32000,
                              intermediate=2816, heads=16, kv_heads=16) for i in range(2)]
    assert 300e6 < inspect_model(models[0]).params < 330e6
    predicted = plan_merge(linear(models), MergeOptions(out_shard_size=shard)).host_peak
    measured = measured_peak(root / "out", shard, models)
    print(f"medium {shard}: predicted {predicted / MiB:.0f} MiB, measured {measured / MiB:.0f}")
    assert abs(predicted - measured) <= 0.25 * measured


def test_evolve_plan_counts_one_resident_model_per_ray_actor(tiny_models, tmp_path):
    """Each Ray actor is a process with its own resident model: on the CPU the host holds
    N of every term but the shared, memory-mapped sources; on CUDA each actor has its own
    GPU (per-GPU terms unchanged) and the host N runtimes."""
    from pipelines.config import EvolveJob
    from pipelines.plan import plan_evolve
    from tests.merge.evolve_job import job_dict

    def host(device, **changes):
        cfg = EvolveJob.model_validate(job_dict(tiny_models, tmp_path / "s",
                                                options={"device": device}, **changes))
        plan = plan_evolve(cfg)
        return {t.name: t.bytes for t in plan.host}, {t.name: t.bytes for t in plan.gpu}

    one, _ = host("cpu")
    three, _ = host("cpu", ray=True, workers=3)
    assert three["sources (mmap)"] == one["sources (mmap)"]
    for name in ("resident model", "KV cache", "merge accumulator", "runtime"):
        assert three[name] == 3 * one[name], name
    assert host("cpu", ray=True)[0] == one  # one actor by default on the CPU
    gpu_one, per_gpu_one = host("cuda")
    gpu_two, per_gpu_two = host("cuda", ray=True, workers=2)
    assert per_gpu_two == per_gpu_one
    assert gpu_two["runtime"] == 2 * gpu_one["runtime"]
