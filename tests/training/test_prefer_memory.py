"""The prefer job's memory estimate: two sequences per row and the reference on top of the
train estimate; `kyara plan` prints the number the job refuses on; the Gemma-2 config fits
24 GiB by the planner."""

from __future__ import annotations

import re

import pytest
import yaml

from pipelines.config import ConfigError, load_job, parse_job
from pipelines.jobs import JobContext, get_job
from pipelines.plan import GiB, model_shape
from pipelines.training import memory
from pipelines.workspace import Workspace
from tests.conftest import REPO, run_kyara
from tests.training.prefer_helpers import pair_rows, prefer_job, write_rows

GEMMA2_2B = memory.ModelShape(params=2_614_341_888, hidden=2304, layers=26, heads=8,
                              intermediate=9216, vocab=256000, kv_heads=4, head_dim=256)


def test_prefer_estimate_is_the_train_estimate_at_two_sequences_plus_the_reference():
    train = parse_job({"job": "train", "name": "t", "base": "b", "batch_size": 8,
                       "max_seq_len": 256}, "t")
    sizes = memory.DataSizes(256, 64)
    dpo = parse_job(prefer_job(data="x", batch_size=4, max_seq_len=256,
                               lora={"r": 16}), "t")
    orpo = parse_job(prefer_job(data="x", batch_size=4, max_seq_len=256, method="orpo",
                                lora={"r": 16}), "t")
    plain = memory.train_estimate(train, GEMMA2_2B, sizes, cuda=True)
    est_orpo = memory.train_estimate(orpo, GEMMA2_2B, sizes, cuda=True)
    est_dpo = memory.train_estimate(dpo, GEMMA2_2B, sizes, cuda=True)
    # DPO: the train estimate at 4 pairs = 8 sequences, plus the reference (a frozen copy of
    # the adapter, the reference pass's logits of the trained positions).
    assert est_dpo.total - plain.total == (est_dpo.lora_params * 4
                                           + 8 * 64 * GEMMA2_2B.vocab * 4)
    # ORPO: no reference, but TRL's ORPO keeps the logits of every position (three fp32
    # copies) and copies the chosen half once more for its NLL term.
    assert est_orpo.adapter == plain.adapter
    assert est_orpo.logits == (3 * 8 * 256 + 4 * 256) * GEMMA2_2B.vocab * 4
    assert est_orpo.total - plain.total == est_orpo.logits - plain.logits
    assert est_orpo.total > est_dpo.total  # as measured on the H200 (bench/README.md)


def test_gemma2_config_fits_24_gib_by_the_planner():
    cfg = load_job(REPO / "configs" / "jobs" / "prefer-ayane-gemma2.yaml")
    assert cfg.job == "prefer" and not cfg.qlora and cfg.pairs is not None
    sizes = memory.DataSizes.bound(cfg)  # every row max_seq_len long: an upper bound
    est = memory.train_estimate(cfg, GEMMA2_2B, sizes, cuda=True)
    device = memory.Device("cuda", "a 24 GiB GPU", 24 * GiB, 24 * GiB)
    assert memory.refusal(cfg, GEMMA2_2B, sizes, device, est) is None, est.describe()


def test_kyara_plan_prints_the_number_the_prefer_job_refuses_on(train_configs, tmp_path,
                                                                 monkeypatch):
    data = write_rows(tmp_path / "prefs.jsonl", pair_rows())
    spec = prefer_job(data=str(data), batch_size=8)
    job_file = train_configs / "jobs" / "tiny-prefer.yaml"
    job_file.write_text(yaml.safe_dump(spec, allow_unicode=True, sort_keys=False),
                        encoding="utf-8")
    plan = run_kyara("plan", str(job_file), "--ram", "1GiB",
                     env={"KYARA_CONFIGS": str(train_configs),
                          "KYARA_HOME": str(tmp_path / "home")})
    assert plan.returncode in (0, 1), plan.stderr
    device = re.search(r"^prefer on (cpu|cuda)$", plan.stdout, re.M)
    assert device, plan.stdout
    place = "GPU" if device.group(1) == "cuda" else "host"
    printed = re.search(rf"^{place} peak ([0-9.]+ GiB)", plan.stdout, re.M).group(1)
    assert "two sequences per row" in plan.stdout

    monkeypatch.setattr(memory, "detect_device", lambda: memory.Device(
        device.group(1), "the test device", 1.0 * GiB, 2.0 * GiB))
    ctx = JobContext.create(Workspace.load(train_configs), tmp_path / "run")
    with pytest.raises(ConfigError) as caught:
        list(get_job("prefer").run(parse_job(spec, "test"), ctx))
    refused = re.search(r"it needs ~([0-9.]+ GiB)", str(caught.value))
    assert refused and refused.group(1) == printed, caught.value


def test_plan_sizes_with_pairs_are_the_bound_of_the_samples(train_configs, tiny_gemma):
    ws = Workspace.load(train_configs)
    cfg = parse_job(prefer_job(pairs={"max_new_tokens": 20, "limit": 3}), "t")
    sizes = memory.sizes_from_files(cfg, ws, tiny_gemma)
    assert sizes.trained_per_example == 22
    assert sizes.seq_len > 22
    shape = model_shape(tiny_gemma)
    assert memory.train_estimate(cfg, shape, sizes, cuda=False).total > 0
