"""Resume after SIGKILL, for real, for the prefer job: a DPO process on the tiny Gemma is
killed once a complete checkpoint exists; the next run of the same job goes on from it."""

from __future__ import annotations

import signal

import pytest
import yaml

from pipelines.events import iter_events
from pipelines.training.trainer import COMPLETE
from tests.training.prefer_helpers import pair_rows, prefer_job, write_rows
from tests.training.test_resume import kill_after_a_checkpoint, start


@pytest.mark.slow
@pytest.mark.parametrize("on_sft", [False, True], ids=["fresh-lora", "on-sft-adapter"])
def test_prefer_resumes_after_sigkill(train_configs, tmp_path, on_sft):
    changes = {}
    if on_sft:  # the quick-start's path: a copy of an SFT adapter, DPO's "ref" beside it
        from pipelines.config import parse_job
        from pipelines.jobs import JobContext, get_job
        from pipelines.workspace import Workspace
        from tests.training.conftest import train_job

        sft = parse_job(train_job(variant="tiny-sft", eval_questions=0, max_steps=2), "t")
        list(get_job("train").run(sft, JobContext.create(Workspace.load(train_configs),
                                                         tmp_path / "sft")))
        changes["base"] = "tiny-sft"
    data = write_rows(tmp_path / "prefs.jsonl", pair_rows())
    job = prefer_job(name="prefer-resume", data=str(data), max_steps=300, save_steps=5,
                     eval_questions=0, keep_checkpoints=3, **changes)
    cfg_path = train_configs / "jobs" / "prefer-resume.yaml"
    cfg_path.write_text(yaml.safe_dump(job, allow_unicode=True, sort_keys=False),
                        encoding="utf-8")
    out = tmp_path / "home" / "runs" / "prefer-resume"
    checkpoints = out / "checkpoints"

    first = start(cfg_path, tmp_path / "run1", train_configs)
    kill_after_a_checkpoint(first, checkpoints)
    assert first.returncode == -signal.SIGKILL
    done = sorted(int(p.parent.name.split("-")[1]) for p in checkpoints.glob(f"*/{COMPLETE}"))
    assert done and done[-1] < 300
    last = done[-1]

    second = start(cfg_path, tmp_path / "run2", train_configs)
    assert second.wait(timeout=300) == 0
    events = list(iter_events(tmp_path / "run2" / "events.jsonl"))
    assert events[-1].type == "done", events[-1]
    assert f"resuming from checkpoint-{last}" in [e.message for e in events if e.type == "log"]
    progress = [e.current for e in events if e.type == "progress" and e.stage == "train"]
    assert progress[0] == last and progress[-1] == 300
    assert events[-1].summary["resumed_from"] == f"checkpoint-{last}"
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert not (out / "adapter" / "ref").exists()
