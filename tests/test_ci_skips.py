"""Under CI=true a test skipped for a missing tool, right, extra or package fails (issue 27,
item 10): tests/conftest.py turns those skips into failures; other skips stay skips."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import REPO

PROBES = '''
import pytest

def test_needs_tmux():
    pytest.skip("tmux not installed")

def test_needs_the_extra():
    pytest.importorskip("kyara_no_such_extra_module")

def test_for_cpu_builds_only():
    pytest.skip("this llama.cpp offloads to a GPU: the warning is for CPU builds")
'''


def run_probes(tmp_path, ci: str | None):
    (tmp_path / "test_probes.py").write_text(PROBES, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rfs", "-p", "no:cacheprovider",
                           "-p", "tests.conftest", "--rootdir", str(tmp_path),
                           str(tmp_path / "test_probes.py")],
                          cwd=REPO, env={**env, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=120, check=False)


def test_ci_fails_the_skips_it_exists_to_run(tmp_path):
    done = run_probes(tmp_path, "true")
    assert done.returncode == 1, done.stdout
    assert "2 failed, 1 skipped" in done.stdout
    assert "CI must not skip this: Skipped: tmux not installed" in done.stdout


def test_at_a_desk_they_stay_skips(tmp_path):
    done = run_probes(tmp_path, None)
    assert done.returncode == 0 and "3 skipped" in done.stdout, done.stdout
