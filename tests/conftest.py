import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"


@pytest.fixture(scope="session", autouse=True)
def embedder_dir(tmp_path_factory):
    """Built embedders (e5-onnx: ~10 s to build) are shared by the whole run, the way a
    user's <home>/models keeps them; every test still gets its own home. Session-wide, so
    module-scoped fixtures that index facts see it too."""
    folder = tmp_path_factory.mktemp("embedders")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KYARA_EMBEDDER_DIR", str(folder))
        yield folder


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
