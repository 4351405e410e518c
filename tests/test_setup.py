"""The two commands: the stamp that makes a second `make` install nothing, and doctor."""

import hashlib
import shutil
import subprocess

import pytest

from tests.conftest import REPO, run_kyara


def _make_q(folder, venv):
    return subprocess.run(["make", "-q", "venv", f"VENV={venv}"], cwd=folder, check=False,
                          capture_output=True, text=True, timeout=60)


def test_stamp_is_keyed_on_pyproject(tmp_path):
    shutil.copy(REPO / "Makefile", tmp_path / "Makefile")
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    venv = tmp_path / "venv"
    venv.mkdir()
    digest = hashlib.sha256((tmp_path / "pyproject.toml").read_bytes()).hexdigest()[:16]
    assert _make_q(tmp_path, venv).returncode == 1  # no stamp: make would install
    (venv / f".kyara-installed-{digest}").touch()
    assert _make_q(tmp_path, venv).returncode == 0  # stamp present: nothing to do
    with open(tmp_path / "pyproject.toml", "a") as f:
        f.write("\n# changed\n")
    assert _make_q(tmp_path, venv).returncode == 1  # pyproject changed: reinstall


def test_this_checkout_is_up_to_date_after_make():
    if not any((REPO / ".venv").glob(".kyara-installed-*")):
        pytest.skip("run through `make test`: no .venv stamp in this checkout")
    assert _make_q(REPO, REPO / ".venv").returncode == 0


def test_doctor_reports_and_never_prints_the_key(tmp_path):
    canary = "sk-canary-" + "7f3a9b1c" * 4
    proc = run_kyara("doctor", env={"OPENAI_API_KEY": canary}, timeout=300)
    text = proc.stdout + proc.stderr
    assert canary not in text and "7f3a9b1c" not in text
    assert proc.returncode == 0, text
    for name in ("python", "torch", "llama.cpp", "transformers", "peft", "mergekit",
                 "personas", "model variants", "store", "judge"):
        assert name in text, name
    assert "OPENAI_API_KEY is set" in text
    assert "ayane" in text and "gemma3-270m" in text
    # the store was created under KYARA_HOME with private permissions
    store = tmp_path / "home" / "store"
    assert store.is_dir() and (store.stat().st_mode & 0o777) == 0o700


def test_doctor_exit_1_when_default_setup_is_missing(tmp_path):
    configs = tmp_path / "configs"
    shutil.copytree(REPO / "configs", configs)
    shutil.rmtree(configs / "personas" / "ayane")
    proc = run_kyara("doctor", "--configs", str(configs), env={"OPENAI_API_KEY": ""},
                     timeout=300)
    assert proc.returncode == 1
    assert "personas" in proc.stderr and "failed" in proc.stderr
    assert "OPENAI_API_KEY is NOT set" in proc.stdout


def test_doctor_fails_when_the_default_variants_adapter_is_missing(tmp_path):
    configs = tmp_path / "configs"
    shutil.copytree(REPO / "configs", configs, ignore=shutil.ignore_patterns("adapter.gguf"))
    proc = run_kyara("doctor", "--configs", str(configs), env={"OPENAI_API_KEY": ""},
                     timeout=300)
    assert proc.returncode == 1
    text = " ".join(proc.stdout.split())
    assert "LoRA adapter" in text and "is missing" in text
