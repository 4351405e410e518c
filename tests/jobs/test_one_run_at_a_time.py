"""One run of a job at a time (issue 27, item 8): the runner holds an exclusive lock on the
job's output for the whole run; a second start is one line naming the run that holds it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import yaml

from pipelines.config import load_job
from pipelines.events import iter_events
from pipelines.jobs.runner import hold_output
from tests.conftest import CONFIGS, REPO


def start(job, run_dir, home):
    return subprocess.run([sys.executable, "-m", "pipelines", "run", str(job), "--run-dir",
                           str(run_dir), "--configs", str(CONFIGS)],
                          env={**os.environ, "KYARA_HOME": str(home)}, cwd=REPO,
                          capture_output=True, text=True, timeout=300, check=False)


def test_a_second_run_on_one_output_is_refused_naming_the_first(tmp_path):
    home = tmp_path / "home"
    job = tmp_path / "export-x.yaml"  # refused by its own checks once it may start
    job.write_text(yaml.safe_dump({"job": "export", "name": "export-x",
                                   "variant": "no-such-variant"}, sort_keys=False),
                   encoding="utf-8")
    cfg = load_job(job)
    with hold_output(cfg, home, "run-A") as lock:
        holder = json.loads(lock.read_text(encoding="utf-8"))
        assert holder["run_id"] == "run-A" and holder["pid"] == os.getpid()
        assert oct(lock.stat().st_mode & 0o777) == "0o600"
        start(job, tmp_path / "second", home)
        last = list(iter_events(tmp_path / "second" / "events.jsonl"))[-1]
        assert last.type == "error" and last.kind == "config"
        out = home / "exports" / "export-x"
        assert last.message.startswith(f"{out} is in use by run run-A (pid {os.getpid()}, "
                                       "started ")
        assert "\n" not in last.message
    # released: the next run gets as far as the job's own checks
    start(job, tmp_path / "third", home)
    last = list(iter_events(tmp_path / "third" / "events.jsonl"))[-1]
    assert last.type == "error" and "in use by" not in last.message
    assert "no-such-variant" in last.message


def test_a_kind_without_an_output_is_locked_by_name(tmp_path):
    cfg = load_job(_write(tmp_path / "idx.yaml", {"job": "index", "name": "idx",
                                                  "persona": "ayane"}))
    home = tmp_path / "home"
    with hold_output(cfg, home, "run-A") as lock:
        assert lock == home / "runs" / ".locks" / "index-idx.lock"
        import pytest

        from pipelines.jobs.runner import OutputBusy

        with pytest.raises(OutputBusy) as busy:
            with hold_output(cfg, home, "run-B"):
                pass
        assert "the index job 'idx' is in use by run run-A" in str(busy.value)


def _write(path, data):
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path
