"""Nothing planted in the current directory runs as the user (issue 27, item 2): kyara's own
Python children start with the safe path, and a ./configs is never taken on its own."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipelines.processes import ROOT, child_env, python
from tests.conftest import CONFIGS


@pytest.fixture
def planted(tmp_path, monkeypatch):
    """A folder holding a json.py that leaves a marker when imported; the tests stand in it."""
    folder = tmp_path / "shared"
    folder.mkdir()
    marker = tmp_path / "imported"
    (folder / "json.py").write_text(
        f"open({str(marker)!r}, 'w').write('planted')\nraise ImportError('planted')\n",
        encoding="utf-8")
    monkeypatch.chdir(folder)
    return marker


def test_a_plain_python_child_would_import_it(planted):
    """The hazard is real: `python -c` / `-m` started here imports ./json.py."""
    subprocess.run([sys.executable, "-c", "import json"], check=False, capture_output=True)
    assert planted.exists()


def test_kyaras_python_children_do_not(planted):
    done = subprocess.run(python("-c", "import json, sys; print(sys.flags.safe_path)"),
                          env=child_env(), check=True, capture_output=True, text=True)
    assert done.stdout.strip() == "True" and not planted.exists()
    # a grandchild started the plain way inherits the safe path through the environment
    subprocess.run(python("-c", "import subprocess, sys; "
                          "subprocess.run([sys.executable, '-c', 'import json'])"),
                   env=child_env(), check=True, capture_output=True)
    assert not planted.exists()


def test_pythonpath_keeps_only_absolute_entries():
    env = child_env({"PYTHONPATH": os.pathsep.join(["", ".", "rel/dir", "/abs/dir"]),
                     "HOME": "/home/x"})
    assert env["PYTHONPATH"].split(os.pathsep) == [str(ROOT), "/abs/dir"]
    assert env["PYTHONSAFEPATH"] == "1" and env["HOME"] == "/home/x"


def test_the_model_worker_started_here_does_not(planted, tmp_path, monkeypatch):
    from pipelines.inference.base import GenerationOptions
    from pipelines.inference.worker import WorkerBackend
    from tests.inference.standin_backends import standin_variant

    monkeypatch.setenv("KYARA_BACKEND_MODULES",
                       "gguf=tests.inference.standin_backends:CrashBackend")
    backend = WorkerBackend(standin_variant(tmp_path), tmp_path / "home")
    try:
        text = "".join(d.text for d in backend.stream(
            [{"role": "user", "content": "こんにちは"}], GenerationOptions(max_new_tokens=4))
            if not d.done)
    finally:
        backend.close()
    assert text and not planted.exists()


def test_a_job_started_here_does_not(planted, tmp_path):
    from console.jobs import launch, refresh
    from pipelines.workspace import Workspace

    ws = Workspace.load(CONFIGS)
    job = tmp_path / "bad-eval.yaml"  # refused at once by the runner: enough to import json
    job.write_text(yaml.safe_dump({"job": "eval", "name": "bad-eval", "persona": "ayane",
                                   "variants": ["no-such-variant"], "judge": "gpt-4o-mini"}),
                   encoding="utf-8")
    run = launch(job, ws, run_dir=tmp_path / "run")
    deadline = time.monotonic() + 120
    while not refresh(run).finished and time.monotonic() < deadline:
        time.sleep(0.2)
    assert refresh(run).finished, "the runner did not finish"
    assert (tmp_path / "run" / "events.jsonl").is_file()  # it ran, from the planted folder
    assert not planted.exists()


def test_a_configs_folder_here_is_named_never_taken(tmp_path, monkeypatch, capsys):
    from pipelines import workspace

    here = tmp_path / "configs"
    here.mkdir()
    (here / "kyara.yaml").write_text("llama_cpp_dir: /tmp/evil\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("KYARA_CONFIGS", raising=False)
    monkeypatch.setattr(workspace, "_SAID", set())
    assert workspace.find_configs_dir() == workspace.PACKAGED_CONFIGS
    assert workspace.find_configs_dir() == workspace.PACKAGED_CONFIGS
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"kyara: not using {here} (a configs/ in the current directory is taken "
                   f"only when named: KYARA_CONFIGS={here} or --configs {here})"]
    monkeypatch.setenv("KYARA_CONFIGS", str(here))
    assert workspace.find_configs_dir() == here
    assert Path(workspace.find_configs_dir("elsewhere")) == Path("elsewhere")
