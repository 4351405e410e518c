"""The console's side: a launched job is detached (it outlives a SIGKILLed launcher), can be
cancelled (SIGTERM to its group -> cancelled), and one killed outright reads as lost; a
restarted console finds every run again from the store and events.jsonl."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
from typer.testing import CliRunner

from console import jobs
from console.cli import app
from store import Store
from tests.conftest import REPO
from tests.jobs.conftest import wait_for


@pytest.fixture
def store(workspace):
    store = Store.open(workspace.settings.store_path())
    yield store
    for run in jobs.list_runs(store):  # a failed test leaves no job running behind it
        if run.pid and jobs.process_alive(run.pid, run.id):
            os.killpg(run.pid, signal.SIGKILL)


def events_so_far(run):
    return jobs.tail(run.run_dir, 0)[0]


def wait_ended(run, timeout=30):
    wait_for(lambda: not jobs.process_alive(run.pid, run.id), timeout, what="the job to end")


def test_detached_job_survives_its_launcher_being_killed(fake_jobs, job_file, configs, store):
    cfg = job_file("slow", steps=8)
    launcher = textwrap.dedent(f"""
        import sys, time
        from console.jobs import launch
        from pipelines.workspace import Workspace
        handle = launch({str(cfg)!r}, Workspace.load({str(configs)!r}))
        print(handle.id, handle.pid, flush=True)
        time.sleep(60)  # a console that stays up until it is killed
    """)
    # Its own session, like a login shell over SSH: killing the group is the dropped link.
    proc = subprocess.Popen([sys.executable, "-c", launcher], stdout=subprocess.PIPE,
                            text=True, cwd=REPO, start_new_session=True)
    run_id, pid = proc.stdout.readline().split()
    pid = int(pid)
    assert os.getsid(pid) == pid != os.getsid(proc.pid)  # the job leads its own session
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    run = jobs.get_run(store, run_id)
    assert run.status in ("starting", "running")
    wait_for(lambda: jobs.read_exit(run.run_dir), 30, what="exit.json")
    assert jobs.refresh(run).status == "done"
    assert events_so_far(run)[-1].summary["steps"] == 8
    assert store.get("runs", run_id)["status"] == "done"


def test_cancel_stops_the_run_as_cancelled(fake_jobs, job_file, workspace, store):
    run = jobs.launch(job_file("slow", steps=300), workspace, store=store)
    assert store.get("runs", run.id)["status"] in ("starting", "running")
    wait_for(lambda: any(e.type == "progress" for e in events_so_far(run)), 30,
             what="the first progress event")
    assert jobs.status(run) == "running"
    assert jobs.cancel(run)
    wait_ended(run, timeout=10)
    assert jobs.status(run) == "cancelled"
    last = events_so_far(run)[-1]
    assert (last.type, last.kind, last.message) == ("error", "cancelled", "cancelled (SIGTERM)")
    exit_info = jobs.read_exit(run.run_dir)
    assert exit_info["status"] == "cancelled" and exit_info["exit_code"] == 143
    assert not jobs.cancel(run)  # nothing left to cancel

    # A restarted console: a fresh store handle, the list, then the events from offset 0.
    again = {r.id: r for r in jobs.list_runs(Store.open(workspace.settings.store_path()))}
    assert again[run.id].status == again[run.id].stored_status == "cancelled"
    replay, offset = jobs.tail(again[run.id].run_dir, 0)
    assert replay[0].type == "start" and replay[-1].kind == "cancelled"
    assert offset == (run.run_dir / "events.jsonl").stat().st_size


def test_cancel_while_the_runner_is_still_starting(fake_jobs, job_file, workspace, store):
    run = jobs.launch(job_file("slow", steps=300), workspace, store=store)
    assert jobs.cancel(run)  # at once: the runner is still importing, no handler yet
    wait_ended(run, timeout=20)
    assert jobs.status(run) == "cancelled"  # held until it could be handled, not lost
    events = events_so_far(run)
    assert [(e.type, e.kind) for e in events] == [("error", "cancelled")]  # the job never began
    assert jobs.read_exit(run.run_dir)["exit_code"] == 143


def test_a_killed_job_is_lost(fake_jobs, job_file, workspace, store):
    run = jobs.launch(job_file("slow", steps=300), workspace, store=store)
    wait_for(lambda: events_so_far(run), 30, what="the start event")
    os.killpg(run.pid, signal.SIGKILL)  # no chance to write anything
    wait_ended(run, timeout=10)
    assert jobs.status(run) == "lost"
    assert store.get("runs", run.id)["status"] == "running"  # what the runner last said
    [fixed] = jobs.reconcile(store)
    assert fixed.id == run.id
    row = store.get("runs", run.id)
    assert row["status"] == "lost"
    assert json.loads(row["summary_json"])["error"]["kind"] == "lost"
    last = list(jobs.follow(jobs.get_run(store, run.id), interval=0.01))[-1]
    assert (last.type, last.kind) == ("error", "lost")


def test_kyara_jobs_commands(fake_jobs, job_file, configs, store):
    runner = CliRunner()
    cfg = job_file("fast")
    started = runner.invoke(app, ["jobs", "run", str(cfg), "--follow", "--configs", str(configs)])
    assert started.exit_code == 0, started.output
    assert "started run" in started.output and " done " in started.output
    # untrusted text from the job: shown literally, escape sequences made visible
    assert "[bold red]not markup[/] 絢音 \\x1b[31m" in started.output
    assert "\x1b" not in started.output
    [run] = jobs.list_runs(store)

    listed = runner.invoke(app, ["jobs", "list", "--configs", str(configs)])
    assert listed.exit_code == 0 and run.id[:8] in listed.output and "done" in listed.output

    shown = runner.invoke(app, ["jobs", "show", run.id[:8], "--configs", str(configs)])
    assert shown.exit_code == 0 and run.id in shown.output and "metric loss" in shown.output

    refused = runner.invoke(app, ["jobs", "cancel", run.id[:8], "--configs", str(configs)])
    assert refused.exit_code == 1 and "is not running (status done)" in refused.output

    missing = runner.invoke(app, ["jobs", "show", "nosuchrun", "--configs", str(configs)])
    assert missing.exit_code == 2 and "no run 'nosuchrun'" in missing.output

    bad = configs / "jobs" / "bad.yaml"
    bad.write_text("job: index\nname: x\ncolour: red\n")
    refused = runner.invoke(app, ["jobs", "run", str(bad), "--configs", str(configs)])
    assert refused.exit_code == 2 and "unknown key 'colour'" in refused.output
    assert len(jobs.list_runs(store)) == 1  # a config that does not validate starts nothing


def test_console_side_imports_neither_textual_nor_torch():
    code = ("import sys, console.jobs, console.jobs_cli, pipelines.jobs.runner; "
            "bad = [m for m in ('torch', 'textual', 'lancedb') if m in sys.modules]; "
            "sys.exit(str(bad) if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False,
                          cwd=REPO, timeout=60)
    assert done.returncode == 0, done.stderr


def test_force_runs_a_copy_of_the_job_file_with_force_true(fake_jobs, configs, workspace, store,
                                                           monkeypatch):
    """`kyara jobs run --force` (export: replace the output) runs a copy of the job file with
    `force: true` written into the run directory; the user's file is left as it was; a job
    kind without the option is refused before anything starts."""
    monkeypatch.setenv("KYARA_JOB_MODULES", "export=tests.jobs.fake_job")
    cfg = configs / "jobs" / "export-x.yaml"
    original = "job: export\nname: export-x\nvariant: some-variant\n"
    cfg.write_text(original, encoding="utf-8")
    run = jobs.launch(cfg, workspace, store=store, force=True)
    copy = run.run_dir / "job.yaml"
    assert run.config_path == str(copy)
    from pipelines.config import load_job

    assert load_job(copy).force is True and load_job(copy).variant == "some-variant"
    assert cfg.read_text(encoding="utf-8") == original
    wait_ended(run)
    with pytest.raises(Exception, match="an index job has no force option"):
        jobs.launch(configs / "jobs" / "index-tiny.yaml", workspace, store=store, force=True)
