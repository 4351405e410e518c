import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    """No test touches the user's ~/.local/share/kyara or reads their configs."""
    monkeypatch.setenv("KYARA_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("KYARA_STORE", raising=False)
    monkeypatch.delenv("KYARA_CONFIGS", raising=False)


def run_kyara(*args, env=None, cwd=None, timeout=120):
    """Run the real `kyara` entry point in a subprocess (as a user would)."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "console", *args],
        capture_output=True, text=True, check=False, env=full_env, cwd=cwd or REPO, timeout=timeout,
    )
