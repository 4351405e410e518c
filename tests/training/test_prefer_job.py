"""The prefer job on the tiny Gemma: DPO end to end (events, adapter, registered variant,
before / after), on top of an SFT adapter (a new adapter, the original untouched), KTO and
ORPO, and bad preference files refused before any model is loaded."""

from __future__ import annotations

import hashlib
import json

import pytest

from pipelines.config import ConfigError, HFVariant, parse_job
from pipelines.jobs import JobContext, get_job
from pipelines.variants import variant_row_id
from pipelines.workspace import Workspace
from tests.training.prefer_helpers import kto_rows, pair_rows, prefer_job, write_rows


def run_job(configs, tmp_path, **changes):
    ws = Workspace.load(configs)
    cfg = parse_job(prefer_job(**changes), "test")
    ctx = JobContext.create(ws, tmp_path / "run")
    return list(get_job("prefer").run(cfg, ctx)), ctx


def losses(events):
    return [e.value for e in events if e.type == "metric" and e.name == "loss"]


def assert_plain_peft(adapter, model_dir):
    """The adapter loads in plain PEFT on the base and changes nothing about its shape."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir),
                                      str(adapter))
    assert list(model.peft_config) == ["default"]
    assert not (adapter / "ref").exists()  # the reference copy is not saved


def test_dpo_job_end_to_end(train_configs, tmp_path, tiny_gemma):
    data = write_rows(tmp_path / "prefs.jsonl", pair_rows())
    write_rows(train_configs / "personas" / "ayane" / "eval.jsonl",
               [{"id": "e0", "question": "お名前は？", "expect": ["絢音"]},
                {"id": "e1", "question": "好きな飲み物は？", "expect": ["紅茶", "ダージリン"]}])
    events, ctx = run_job(train_configs, tmp_path, data=str(data), variant="tiny-gemma-dpo",
                          eval_fraction=0.25)
    assert events[0].type == "start" and events[-1].type == "done", events[-1]
    stages = [e.stage for e in events if e.type == "stage"]
    assert stages == ["data", "model", "memory", "load", "train", "save", "eval"]
    steps = [e.current for e in events if e.type == "progress" and e.stage == "train"]
    assert steps[0] == 0 and steps[-1] == 2
    names = {e.name for e in events if e.type == "metric"}
    assert {"loss", "eval_loss", "reward_margin", "reward_accuracy", "memory_estimate_gb",
            "tokens_per_s"} <= names
    assert all(v == v and abs(v) < 1e6 for v in losses(events))  # finite
    out = ctx.home / "runs" / "tiny-prefer"
    assert (out / "checkpoints" / "checkpoint-1" / "kyara-complete.json").is_file()
    assert_plain_peft(out / "adapter", tiny_gemma)
    row = ctx.store.get("variants", variant_row_id("tiny-gemma-dpo"))
    assert row["base"] == "tiny-gemma" and row["source_run_id"] == ctx.run_id
    variant = Workspace.load(train_configs).variant("tiny-gemma-dpo")
    assert isinstance(variant, HFVariant) and variant.adapter == str((out / "adapter").resolve())
    summary = events[-1].summary
    mini = summary["mini_eval"]
    assert mini["before"]["variant"] == "tiny-gemma" and mini["after"]["n"] == 2
    assert mini["intervals"]["after"]["ends_maru"]["n"] == 2
    assert "Wilson 95% CI" in mini["table"] and "fact hits" in mini["table"]
    assert mini["intervals"]["before"]["fact_hits"]["n"] == 2
    saved = json.loads((out / "eval.json").read_text(encoding="utf-8"))
    assert len(saved["replies"]) == 2


def digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}


def test_dpo_on_top_of_an_sft_adapter_makes_a_new_adapter(train_configs, tmp_path):
    from tests.training.conftest import train_job

    ws = Workspace.load(train_configs)
    sft = parse_job(train_job(variant="tiny-gemma-sft", eval_questions=0, max_steps=2), "t")
    list(get_job("train").run(sft, JobContext.create(ws, tmp_path / "sft")))
    sft_adapter = tmp_path / "home" / "runs" / "tiny-train" / "adapter"
    before = digest(sft_adapter)
    data = write_rows(tmp_path / "prefs.jsonl", pair_rows())
    events, ctx = run_job(train_configs, tmp_path, base="tiny-gemma-sft", data=str(data),
                          variant="tiny-gemma-sft-dpo")
    assert events[-1].type == "done", events[-1]
    summary = events[-1].summary
    assert summary["start_adapter"] == str(sft_adapter.resolve())
    assert digest(sft_adapter) == before  # the original adapter is untouched
    new = ctx.home / "runs" / "tiny-prefer" / "adapter"
    config = json.loads((new / "adapter_config.json").read_text())
    assert config["r"] == 4
    # the starting variant is the "before" side
    assert summary["mini_eval"]["before"]["variant"] == "tiny-gemma-sft"
    from safetensors.torch import load_file

    old_w, new_w = load_file(sft_adapter / "adapter_model.safetensors"), \
        load_file(new / "adapter_model.safetensors")
    assert old_w.keys() == new_w.keys()
    assert any((old_w[k] - new_w[k]).abs().max() > 0 for k in old_w)  # trained further


@pytest.mark.parametrize("method", ["kto", "orpo"])
def test_kto_and_orpo_train_and_save_a_plain_peft_adapter(train_configs, tmp_path, tiny_gemma,
                                                          method):
    rows = kto_rows() if method == "kto" else pair_rows()
    data = write_rows(tmp_path / "prefs.jsonl", rows)
    events, ctx = run_job(train_configs, tmp_path, data=str(data), method=method,
                          max_steps=3, eval_questions=0)
    assert events[-1].type == "done", events[-1]
    found = losses(events)
    assert found and all(v == v and abs(v) < 1e6 for v in found)
    assert_plain_peft(ctx.home / "runs" / "tiny-prefer" / "adapter", tiny_gemma)


BAD = [
    ({"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant",
                                                                "content": "a"}]},
     "rejected: missing"),
    ({"prompt": [{"role": "user", "content": "q"}],
      "chosen": [{"role": "assistant", "content": "a"}],
      "rejected": [{"role": "assistant", "content": "  "}]}, "rejected: the reply is empty"),
    ({"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
      "chosen": [{"role": "assistant", "content": "a"}],
      "rejected": [{"role": "assistant", "content": "b"}]}, "must end on the user's turn"),
    ("{not json", "not JSON"),
]


@pytest.mark.parametrize("row,message", BAD)
def test_bad_rows_are_refused_naming_file_and_row_before_loading(train_configs, tmp_path,
                                                                 monkeypatch, row, message):
    import transformers

    def no_loading(*args, **kwargs):
        raise AssertionError("a model or tokenizer was loaded")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", no_loading)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_loading)
    data = write_rows(tmp_path / "prefs.jsonl", [pair_rows()[0], row])
    with pytest.raises(ConfigError) as caught:
        run_job(train_configs, tmp_path, data=str(data))
    text = str(caught.value)
    assert text.startswith(f"{data}: row 2: ") and message in text and "\n" not in text
    assert not (tmp_path / "home" / "runs" / "tiny-prefer" / "adapter").exists()


def test_kto_file_needs_both_labels_and_a_pair_file_unpairs(tmp_path):
    from pipelines.training.preference import read_preferences

    good = [r for r in kto_rows() if r["label"]]
    path = write_rows(tmp_path / "k.jsonl", good)
    with pytest.raises(ConfigError, match="desirable and undesirable"):
        read_preferences(path, "kto")
    rows = read_preferences(write_rows(tmp_path / "p.jsonl", pair_rows()), "kto")
    assert [r["label"] for r in rows[:2]] == [True, False]
    with pytest.raises(ConfigError, match="row 1: dpo needs chosen and rejected"):
        read_preferences(path, "dpo")


def test_config_needs_data_or_pairs():
    with pytest.raises(ConfigError, match="exactly one of 'data'"):
        parse_job(prefer_job(), "prefer.yaml")
    with pytest.raises(ConfigError, match="exactly one of 'data'"):
        parse_job(prefer_job(data="x.jsonl", pairs={}), "prefer.yaml")
    cfg = parse_job(prefer_job(pairs={"samples": 3}), "prefer.yaml")
    assert cfg.pairs.samples == 3 and cfg.method == "dpo"


def test_bad_file_through_the_runner_exits_2_with_one_line(train_configs, tmp_path):
    import os
    import subprocess
    import sys

    import yaml

    from pipelines.events import iter_events
    from tests.conftest import REPO

    bad = {"prompt": [{"role": "user", "content": "q"}],
           "chosen": [{"role": "assistant", "content": "a"}]}
    data = write_rows(tmp_path / "prefs.jsonl", [pair_rows()[0], bad])
    cfg_path = train_configs / "jobs" / "tiny-prefer.yaml"
    cfg_path.write_text(yaml.safe_dump(prefer_job(data=str(data)), allow_unicode=True,
                                       sort_keys=False),
                        encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "-m", "pipelines", "run", str(cfg_path), "--run-dir",
         str(tmp_path / "run"), "--configs", str(train_configs)],
        check=False, cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "KYARA_HOME": str(tmp_path / "home")})
    assert done.returncode == 2, done.stderr
    last = list(iter_events(tmp_path / "run" / "events.jsonl"))[-1]
    assert last.type == "error" and last.message == f"{data}: row 2: rejected: missing"
    assert not (tmp_path / "home" / "runs" / "tiny-prefer").exists()
