"""Constants and helpers the judge tests share. A module with its own name (not
`conftest`, not `tests_*`): pytest puts this folder on sys.path, and other test folders
have conftest modules of their own."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
REPO_CONFIGS = REPO / "configs"
KEY_ENV = "KYARA_JUDGE_TEST_KEY"
KEY = "sk-test-judge-key-0000"


def set_judge(configs: Path, **changes) -> None:
    """Change keys of the test judge's YAML (configs/judges/scripted.yaml)."""
    path = configs / "judges" / "scripted.yaml"
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    data.update(changes)
    path.write_text(yaml.safe_dump(data), encoding="utf-8")


def one_line(message: str) -> str:
    assert "\n" not in message, f"not one line: {message!r}"
    return message


def kyara_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "console", *args]


def run_kyara(*args: str, env: dict | None = None, cwd=None, timeout: float = 120):
    """The real `kyara` entry point in a subprocess, as a user runs it."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run(kyara_command(*args), capture_output=True, text=True, check=False,
                          env=full_env, cwd=cwd or REPO, timeout=timeout)
