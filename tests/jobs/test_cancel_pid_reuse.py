"""Cancel never signals a process that is not the run's (issue 27, item 9): after pid reuse
the pid may belong to another program; the run id on the command line, or for a run started
by hand the runner on the same config, is what makes it the run's."""

from __future__ import annotations

import subprocess
import sys

import pytest

from console.jobs import process_alive

SLEEP = "import time; time.sleep(60)"


@pytest.fixture
def spawn():
    procs = []

    def start(*args: str) -> int:
        proc = subprocess.Popen([sys.executable, "-c", SLEEP, *args])
        procs.append(proc)
        return proc.pid

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


def test_another_program_on_the_runs_pid_is_not_the_run(spawn):
    # once enough to pass: "pipelines" anywhere on the command line
    pid = spawn("--note", "pipelines")
    assert not process_alive(pid, "run-1234", "/jobs/eval.yaml")


def test_the_run_is_found_by_its_id_or_by_the_runner_on_its_config(spawn):
    launched = spawn("pipelines", "run", "/jobs/eval.yaml", "--run-id", "run-1234")
    assert process_alive(launched, "run-1234", "/jobs/eval.yaml")
    assert not process_alive(launched, "run-9999", "/jobs/eval.yaml")  # another run
    by_hand = spawn("pipelines", "run", "configs/jobs/eval.yaml")
    assert process_alive(by_hand, "run-1234", "/work/configs/jobs/eval.yaml")
    assert not process_alive(by_hand, "run-1234", "/work/configs/jobs/train.yaml")
