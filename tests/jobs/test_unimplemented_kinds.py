"""A job kind that nothing implements is never offered: `offered_jobs()` (what the
console's palette, its jobs screen and `kyara jobs list` read) leaves its files out with a
one-line reason, `kyara jobs run` refuses it before starting a run, and no such file ships.
KYARA_JOB_MODULES stand-ins still make a kind runnable for tests.

Every kind the config knows is implemented today, so the tests take `eval` out of JOBS
(`unimplemented_eval`) to stand for the next kind the config learns before its module."""

from __future__ import annotations

import pytest

from pipelines.config import ConfigError
from pipelines.jobs import not_implemented, offered_jobs, require_implemented
from pipelines.workspace import Workspace
from tests.conftest import CONFIGS


@pytest.fixture(autouse=True)
def unimplemented_eval(monkeypatch):
    from pipelines import jobs

    monkeypatch.delitem(jobs.JOBS, "eval")


@pytest.fixture
def eval_file(configs):
    path = configs / "jobs" / "eval-x.yaml"
    path.write_text("job: eval\nname: eval-x\nvariants: [v]\n", encoding="utf-8")
    return path


def test_a_file_of_a_kind_not_implemented_is_left_out_with_its_reason(configs, eval_file):
    jobs, problems = offered_jobs(Workspace.load(configs))
    assert list(jobs) == ["index-tiny"]
    assert problems == [f"{eval_file}: job kind 'eval' is not implemented yet"]
    assert not_implemented("index") is None


def test_a_stand_in_module_makes_the_kind_offered(configs, eval_file, monkeypatch):
    monkeypatch.setenv("KYARA_JOB_MODULES", "eval=tests.jobs.fake_job")
    jobs, problems = offered_jobs(Workspace.load(configs))
    assert sorted(jobs) == ["eval-x", "index-tiny"] and problems == []
    require_implemented("eval")  # no error


def test_launching_refuses_before_any_run_starts(configs, eval_file, tmp_path):
    with pytest.raises(ConfigError, match="not implemented yet"):
        require_implemented("eval", eval_file)
    from typer.testing import CliRunner

    from console.cli import app

    home = tmp_path / "home"
    runner = CliRunner()
    env = {"KYARA_HOME": str(home)}
    done = runner.invoke(app, ["jobs", "run", str(eval_file), "--configs", str(configs)], env=env)
    assert done.exit_code == 2, done.output
    assert f"kyara: {eval_file}: job kind 'eval' is not implemented yet" in done.output
    assert "started run" not in done.output
    assert not (home / "runs").exists()  # no run directory, no run that can only fail
    listed = runner.invoke(app, ["jobs", "list", "--configs", str(configs)], env=env)
    assert listed.exit_code == 0 and "no runs yet" in listed.output
    assert "eval-x.yaml: job kind 'eval' is not implemented yet" in listed.output


def test_every_shipped_job_file_is_of_an_implemented_kind(monkeypatch):
    from pipelines import jobs as registry

    monkeypatch.setitem(registry.JOBS, "eval", "pipelines.jobs.eval")  # as shipped
    jobs, problems = offered_jobs(Workspace.load(CONFIGS))
    assert problems == [] and jobs
    assert Workspace.load(CONFIGS).job_files().keys() == jobs.keys()
