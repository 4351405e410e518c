"""The two commands: the stamp that makes a second `make` install nothing, and doctor."""

import hashlib
import os
import shutil
import subprocess

import pytest

from tests.conftest import REPO, run_kyara
from tests.inference.standin_backends import ENV as STANDIN_ENV
from tests.inference.standin_backends import write_standin_variant


def _make_q(folder, venv):
    return subprocess.run(["make", "-q", "venv", f"VENV={venv}"], cwd=folder, check=False,
                          capture_output=True, text=True, timeout=60)


def _print(folder, name, *args):
    return subprocess.run(["make", "-s", f"print-{name}", *args], cwd=folder, check=True,
                          capture_output=True, text=True, timeout=60).stdout.strip()


def test_stamp_is_keyed_on_pyproject_and_llama_build(tmp_path):
    shutil.copy(REPO / "Makefile", tmp_path / "Makefile")
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    venv = tmp_path / "venv"
    venv.mkdir()
    digest = hashlib.sha256((tmp_path / "pyproject.toml").read_bytes()).hexdigest()[:16]
    key = _print(tmp_path, "LLAMA_KEY")
    assert _make_q(tmp_path, venv).returncode == 1  # no stamp: make would install
    (venv / f".kyara-installed-{digest}-{key}").touch()
    assert _make_q(tmp_path, venv).returncode == 0  # stamp present: nothing to do
    # other llama.cpp build flags (the GPU server's CUDA line): a rebuild, once
    cuda = subprocess.run(["make", "-q", "venv", f"VENV={venv}", "CMAKE_ARGS=-DGGML_CUDA=on"],
                          cwd=tmp_path, check=False, capture_output=True, timeout=60)
    assert cuda.returncode == 1
    with open(tmp_path / "pyproject.toml", "a") as f:
        f.write("\n# changed\n")
    assert _make_q(tmp_path, venv).returncode == 1  # pyproject changed: reinstall


def test_llama_cpp_is_built_without_amx_and_from_a_wheel_keyed_by_its_flags(tmp_path):
    """-march=native stays, AMX goes (llama.cpp's AMX matmul segfaults: issue 13); the
    user's CMAKE_ARGS are appended; pip's version-keyed cache is never used for it."""
    plain = _print(REPO, "LLAMA_KEY")
    cuda = _print(REPO, "LLAMA_KEY", "CMAKE_ARGS=-DGGML_CUDA=on")
    assert plain != cuda and len(plain) == 16
    assert _print(REPO, "LLAMA_WHEEL_DIR").endswith(f"-{plain}")
    plan = subprocess.run(["make", "-n", "venv", f"VENV={tmp_path / 'v'}",
                           "CMAKE_ARGS=-DGGML_CUDA=on -DFOO='a b'"], cwd=REPO, check=True,
                          capture_output=True, text=True, timeout=60).stdout
    build = next(line for line in plan.splitlines() if "CFLAGS=" in line)
    for flag in ("-mno-amx-tile", "-mno-amx-int8", "-mno-amx-bf16"):
        assert flag in build
    # the shell sees the user's CMAKE_ARGS exactly, quotes and all
    assignment = build.strip().split(" CFLAGS=")[0]
    seen = subprocess.run(["bash", "-c", f'{assignment}; printf %s "$CMAKE_ARGS"'],
                          capture_output=True, text=True, check=True).stdout
    assert seen == "-DGGML_CUDA=on -DFOO='a b'"
    wheel = next(line for line in plan.splitlines() if "pip wheel" in line)
    assert "--no-cache-dir" in wheel and "--no-binary llama-cpp-python" in wheel


def test_the_installed_llama_cpp_has_no_amx():
    """What makes the tmux and export tests pass on a CPU with AMX (an Intel Xeon): the
    build carries no AMX code path at all, whatever this machine's CPU is."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from pipelines.doctor import has_amx

    info = llama_cpp.llama_print_system_info().decode()
    assert "AVX" in info  # the string is the one has_amx reads
    assert not has_amx(llama_cpp), info
    if any((REPO / ".venv").glob(".kyara-installed-*")):
        assert (REPO / ".venv" / ".kyara-llama-key").read_text().strip() == _print(
            REPO, "LLAMA_KEY")


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
    # the engine decoded a few tokens of the default variant in a worker process
    engine = " ".join(next(line for line in proc.stdout.splitlines()
                           if line.startswith("engine")).split())
    assert "ok (" in engine and "tok/s" in engine and "ayane-270m" in engine
    cores = len(os.sched_getaffinity(0))
    assert f"n_threads {cores} (usable cores)" in " ".join(proc.stdout.split())
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


def test_the_no_amx_flags_remove_amx_from_a_native_build_for_an_amx_cpu():
    """-march=native on a Sapphire Rapids Xeon means -march=sapphirerapids: the Makefile's
    flags take AMX away from it, before or after -march (what -DGGML_AMX_*=OFF cannot)."""
    cc = shutil.which("gcc") or pytest.skip("no gcc")
    flags = _print(REPO, "LLAMA_NO_AMX").split()

    def macros(*args):
        return subprocess.run([cc, *args, "-dM", "-E", "-"], input="", capture_output=True,
                              text=True, check=True).stdout

    assert "__AMX_INT8__" in macros("-march=sapphirerapids")
    assert "__AMX" not in macros("-march=sapphirerapids", *flags)
    assert "__AMX" not in macros(*flags, "-march=sapphirerapids")


def test_doctor_exit_1_when_the_engine_crashes(tmp_path):
    """The default variant's worker segfaults on its first tokens: doctor says so (the
    signal, the likely cause, the rebuild command) and exits 1."""
    configs = tmp_path / "configs"
    shutil.copytree(REPO / "configs", configs)
    write_standin_variant(configs, tmp_path)
    app = configs / "kyara.yaml"
    app.write_text(app.read_text(encoding="utf-8").replace(
        "default_variant: ayane-270m", "default_variant: standin"), encoding="utf-8")
    proc = run_kyara("doctor", "--configs", str(configs), timeout=300,
                     env={**STANDIN_ENV, "KYARA_STANDIN_CRASH": "1"})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    text = " ".join(proc.stdout.split())
    assert "killed by SIGSEGV" in text and "make rebuild-llama" in text
    assert "engine" in proc.stderr and "Traceback" not in proc.stdout + proc.stderr
