"""Resume after SIGKILL, for real: a training process on a tiny model is killed once a
complete checkpoint exists; the next run of the same job resumes from that step."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from pipelines.events import iter_events
from pipelines.training.trainer import COMPLETE
from tests.conftest import REPO
from tests.training.conftest import train_job


def start(cfg_path, run_dir, configs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "pipelines", "run", str(cfg_path), "--run-dir", str(run_dir),
         "--configs", str(configs)],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "HF_HUB_OFFLINE": "1"}, start_new_session=True)


def kill_after_a_checkpoint(proc: subprocess.Popen, checkpoints, group: bool = True) -> None:
    """SIGKILL `proc` (its process group, or the job's process alone) once a complete
    checkpoint is there and training has gone on into the next steps: the kill lands
    mid-training."""
    try:
        deadline = time.monotonic() + 240
        while not list(checkpoints.glob(f"checkpoint-*/{COMPLETE}")):
            assert proc.poll() is None, "the job ended before a checkpoint"
            assert time.monotonic() < deadline, "no complete checkpoint within 240 s"
            time.sleep(0.05)
        time.sleep(0.5)
    finally:
        if group:
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.mark.slow
def test_resume_after_sigkill(train_configs, tmp_path):
    job = train_job(name="resume-tiny", max_steps=400, save_steps=5, batch_size=2,
                    eval_fraction=0.0, eval_questions=0, keep_checkpoints=3)
    cfg_path = train_configs / "jobs" / "resume-tiny.yaml"
    cfg_path.write_text(yaml.safe_dump(job, allow_unicode=True, sort_keys=False),
                        encoding="utf-8")
    checkpoints = tmp_path / "home" / "runs" / "resume-tiny" / "checkpoints"

    first = start(cfg_path, tmp_path / "run1", train_configs)
    kill_after_a_checkpoint(first, checkpoints)
    assert first.returncode == -signal.SIGKILL
    done = sorted(int(p.parent.name.split("-")[1]) for p in checkpoints.glob(f"*/{COMPLETE}"))
    assert done, "a complete checkpoint must exist"
    last = done[-1]
    assert last < 400

    second = start(cfg_path, tmp_path / "run2", train_configs)
    assert second.wait(timeout=300) == 0
    events = list(iter_events(tmp_path / "run2" / "events.jsonl"))
    assert events[-1].type == "done", events[-1]
    logs = [e.message for e in events if e.type == "log"]
    assert f"resuming from checkpoint-{last}" in logs
    progress = [e.current for e in events if e.type == "progress" and e.stage == "train"]
    assert progress[0] == last and progress[-1] == 400  # went on from there, not from 0
    assert events[-1].summary["resumed_from"] == f"checkpoint-{last}"
    assert (tmp_path / "home" / "runs" / "resume-tiny" / "adapter" /
            "adapter_model.safetensors").is_file()
