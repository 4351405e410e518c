"""Private by construction (issue 27, item 3): under a permissive umask, what kyara's entry
points write in the home has no group or other permission; the home is made 0700; an open
one is named once and fixed only with the user's consent."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO, run_kyara
from tests.inference.standin_backends import ENV as STANDIN_ENV
from tests.inference.standin_backends import write_standin_variant


def open_entries(root: Path) -> list[str]:
    return [f"{p} {stat.S_IMODE(p.lstat().st_mode):04o}"
            for p in (root, *root.rglob("*"))
            if not p.is_symlink() and p.lstat().st_mode & 0o077]


def umask_022():
    os.umask(0o022)


def test_entry_points_leave_nothing_open_under_umask_022(tmp_path):
    import shutil

    configs = tmp_path / "configs"
    shutil.copytree(REPO / "configs", configs)
    write_standin_variant(configs, tmp_path)
    home = tmp_path / "home"  # not made yet: kyara makes it
    env = {**os.environ, **STANDIN_ENV, "KYARA_HOME": str(home)}
    # kyara ask: the home, the store, the worker's log
    ask = subprocess.run([sys.executable, "-m", "console", "ask", "こんにちは", "--variant",
                          "standin", "--configs", str(configs)], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=300, preexec_fn=umask_022,
                         check=False)
    assert ask.returncode == 0, ask.stderr
    assert (home / "logs").is_dir() and (home / "store").is_dir()
    # the job runner started by hand (no console in front of it): a run folder and events
    job = tmp_path / "index.yaml"
    job.write_text("job: index\nname: idx\npersona: ayane\n", encoding="utf-8")
    subprocess.run([sys.executable, "-m", "pipelines", "run", str(job), "--configs",
                    str(configs)], env=env, cwd=REPO, capture_output=True, timeout=600, check=False,
                   preexec_fn=umask_022)
    assert any((home / "runs").iterdir())
    assert open_entries(home) == []


def test_an_open_home_is_named_once_and_fixed_only_when_asked(tmp_path):
    home = tmp_path / "home"
    (home / "runs").mkdir(parents=True)
    os.chmod(home, 0o755)
    os.chmod(home / "runs", 0o755)
    (home / "runs" / "old.log").write_text("x", encoding="utf-8")
    os.chmod(home / "runs" / "old.log", 0o644)
    # at a terminal (stderr a tty) the command names it, once
    import pty

    master, slave = pty.openpty()
    proc = subprocess.run([sys.executable, "-m", "console", "config", "check"], cwd=REPO,
                          env={**os.environ, "KYARA_HOME": str(home)}, stdout=subprocess.PIPE,
                          stderr=slave, timeout=120, check=False)
    os.close(slave)
    try:
        said_raw = os.read(master, 65536).decode("utf-8", "replace")
    except OSError:
        said_raw = ""
    os.close(master)
    assert proc.returncode == 0
    said = [line for line in said_raw.splitlines() if "open to other users" in line]
    assert len(said) == 1 and "kyara doctor --fix-permissions" in said[0]
    # piped (a script, a test), only kyara doctor says it
    assert "open to other users" not in run_kyara("config", "check",
                                                  env={"KYARA_HOME": str(home)}).stderr
    assert stat.S_IMODE(home.stat().st_mode) == 0o755  # nothing changed without consent
    from pipelines.doctor import check_home

    assert check_home(home).status == "warn"
    fixed = check_home(home, fix=True)
    assert fixed.status == "ok" and open_entries(home) == []
    assert check_home(home).status == "ok"
