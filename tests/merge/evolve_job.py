"""Running the evolve job in tests: a scripted judge that rewards the marker, the configs
folder pointing at it, the job's dict, and the job in this process or through the runner."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from pipelines.config import EvolveJob
from pipelines.jobs import JobContext, get_job
from pipelines.workspace import Workspace
from tests.judge.scripted_judge_server import Reply, answer
from tests.merge.evolve_models import marker_share

REPO = Path(__file__).resolve().parents[2]
KEY_ENV = "KYARA_EVOLVE_TEST_KEY"


def score_marker(request) -> Reply:
    """Scores 1..7 by the marker's share of the reply; logprobs make the weighted score
    1 + 6 * share, so the fitness moves smoothly with the weight on model 0."""
    share = min(max(marker_share(request.prompt), 1e-4), 1 - 1e-4)
    return answer("印を数えました。", 7 if share >= 0.5 else 1,
                  score_logprobs={"7": math.log(share), "1": math.log(1 - share)})


def write_configs(root: Path, base_url: str, **judge) -> Path:
    shutil.copytree(REPO / "configs", root, dirs_exist_ok=True)
    data = {"name": "scripted", "provider": "openai_compatible", "model": "scripted-judge",
            "base_url": base_url, "api_key_env": KEY_ENV, "criteria": ["personality"],
            "few_shot": 0, "seed": 0, "concurrency": 4, "timeout_s": 5, "max_retries": 1,
            "temperature": 0.0, "logprobs": True, **judge}
    (root / "judges" / "scripted.yaml").write_text(yaml.safe_dump(data), encoding="utf-8")
    return root


def job_dict(models: list[Path], output: Path, **changes) -> dict:
    data = {"job": "evolve", "name": "evo", "method": "linear",
            "models": [str(m) for m in models], "judge": "scripted",
            "criteria": ["personality"], "population": 4, "generations": 2, "sigma": 0.3,
            "seed": 0, "options": {"device": "cpu"}, "output": str(output),
            "questions_limit": 3, "max_new_tokens": 10, "batch_size": 4, "samples": 2}
    data.update(changes)
    return data


def run_job(configs: Path, run_dir: Path, data: dict) -> list:
    cfg = EvolveJob.model_validate(data)
    ctx = JobContext.create(Workspace.load(configs), run_dir)
    return list(get_job("evolve").run(cfg, ctx))


def records(folder: Path) -> list[dict]:
    lines = (folder / "evaluations.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def kill_after_evaluations(proc: subprocess.Popen, log: Path, n: int = 3) -> None:
    """SIGKILL the job's process group once `log` (evaluations.jsonl) holds `n` records."""
    try:
        deadline = time.monotonic() + 240
        while not log.exists() or log.read_bytes().count(b"\n") < n:
            assert proc.poll() is None, f"the job ended before {n} evaluations"
            assert time.monotonic() < deadline, f"no {n} evaluations within 240 s"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def start_job(cfg_path: Path, run_dir: Path, configs: Path, **env: str) -> subprocess.Popen:
    """The job in its own process (and process group) through the runner."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           # the kind may not be in JOBS of a checkout yet; the runner honours this map
           "KYARA_JOB_MODULES": "evolve=pipelines.jobs.evolve", **env}
    return subprocess.Popen(
        [sys.executable, "-m", "pipelines", "run", str(cfg_path), "--run-dir", str(run_dir),
         "--configs", str(configs)], cwd=REPO, env=env, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
