"""One memory model for a train job: `kyara plan X.yaml` prints the number the train job
refuses on (pipelines/training/memory.py, used by both), and they draw the line at the
same budget."""

from __future__ import annotations

import re

import pytest
import yaml

from pipelines.config import ConfigError, parse_job
from pipelines.jobs import JobContext, get_job
from pipelines.plan import Budget, GiB, model_shape, plan_job
from pipelines.training import memory
from pipelines.workspace import Workspace
from tests.conftest import run_kyara
from tests.training.conftest import train_job


def planned_peak(stdout: str) -> tuple[str, str]:
    """(device, the peak figure as printed) from `kyara plan`'s output."""
    device = re.search(r"^train on (cpu|cuda)$", stdout, re.M)
    assert device, stdout
    place = "GPU" if device.group(1) == "cuda" else "host"
    peak = re.search(rf"^{place} peak ([0-9.]+ GiB)", stdout, re.M)
    assert peak, stdout
    return device.group(1), peak.group(1)


def test_kyara_plan_prints_the_number_the_train_job_refuses_on(train_configs, tmp_path,
                                                                monkeypatch):
    spec = train_job(batch_size=8)
    job_file = train_configs / "jobs" / "tiny-train.yaml"
    job_file.write_text(yaml.safe_dump(spec, allow_unicode=True, sort_keys=False), encoding="utf-8")
    plan = run_kyara("plan", str(job_file), "--ram", "1GiB",
                     env={"KYARA_CONFIGS": str(train_configs),
                          "KYARA_HOME": str(tmp_path / "home")})
    assert plan.returncode in (0, 1), plan.stderr
    device, printed = planned_peak(plan.stdout)
    assert "from the data: longest example" in plan.stdout

    # the job, on a device of the plan's kind with 1 GiB free: it refuses at its memory
    # stage (after reading and tokenising the data, before loading the model)
    monkeypatch.setattr(memory, "detect_device",
                        lambda: memory.Device(device, "the test device", 1.0 * GiB, 2.0 * GiB))
    ws = Workspace.load(train_configs)
    ctx = JobContext.create(ws, tmp_path / "run")
    seen = []
    with pytest.raises(ConfigError) as caught:
        for event in get_job("train").run(parse_job(spec, "test"), ctx):
            seen.append(event)
    refused = re.search(r"it needs ~([0-9.]+ GiB)", str(caught.value))
    assert refused, caught.value
    assert refused.group(1) == printed
    if device == "cpu":  # the budget given is the plan's: the same verdict
        assert plan.returncode == 1 and "does not fit" in plan.stdout

    # the exact figure: the job's metric and the plan's peak, in bytes
    estimate = next(e.value for e in seen if e.type == "metric" and e.name == "memory_estimate_gb")
    budget = Budget(gpu=GiB if device == "cuda" else None, host=GiB, source="given")
    (in_process,) = plan_job(parse_job(spec, "test"), ws, budget)
    peak = in_process.gpu_peak if device == "cuda" else in_process.host_peak
    assert peak == round(estimate * GiB)


def test_plan_and_job_draw_the_line_at_the_same_budget(train_configs, tiny_gemma):
    ws = Workspace.load(train_configs)
    cfg = parse_job(train_job(batch_size=8), "test")
    shape = model_shape(tiny_gemma)
    sizes = memory.sizes_from_files(cfg, ws, tiny_gemma)
    total = memory.train_estimate(cfg, shape, sizes, cuda=False).total
    for free in (total, int(total / memory.MARGIN) - 1024, int(total / memory.MARGIN) + 1024,
                 2 * total):
        device = memory.Device("cpu", "host RAM", float(free), float(2 * total))
        (plan,) = plan_job(cfg, ws, Budget(gpu=None, host=free, source="given"))
        assert plan.host_peak == total
        assert plan.fits == (memory.refusal(cfg, shape, sizes, device) is None), free


def test_with_rag_share_the_plan_bounds_the_retrieval_prompt(train_configs, tiny_gemma):
    """`kyara plan` opens no index: with rag_share its examples carry the retrieval prompt
    with the persona's rag_k longest facts, a bound on what the job's retrieval returns."""
    ws = Workspace.load(train_configs)
    plain = parse_job(train_job(max_seq_len=4096), "test")
    rag = parse_job(train_job(max_seq_len=4096, rag_share=0.5, rag_k=3), "test")
    bound = memory.rag_bound_prompt(rag, ws)
    longest = sorted((f.text for f in ws.persona_data("ayane").knowledge), key=len)[-3:]
    assert all(f"- {text}" in bound for text in longest)
    assert memory.sizes_from_files(rag, ws, tiny_gemma).seq_len > \
        memory.sizes_from_files(plain, ws, tiny_gemma).seq_len


def test_lora_count_follows_grouped_query_attention_and_target_modules():
    shape = memory.ModelShape(params=2_600_000_000, hidden=2304, layers=26, heads=8,
                              intermediate=9216, vocab=256000, kv_heads=4, head_dim=256)
    # Gemma 2 2B, r 16, all-linear: q 2304->2048, k and v 2304->1024, o, gate, up, down
    per_layer = 16 * ((2304 + 2048) + 2 * (2304 + 1024) + (2048 + 2304) + 3 * (2304 + 9216))
    assert memory.lora_params(shape, 16) == 26 * per_layer
    assert memory.lora_params(shape, 16, ["q_proj", "v_proj"]) == 26 * 16 * (4352 + 3328)
