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


# --- where the Makefile finds CUDA (issue 24: the server's CPU build) ----------------------

# what the Makefile's $(shell ...) lines run, so a test PATH can hold these and nothing else
MAKE_TOOLS = ("sh", "echo", "sed", "sha256sum", "cut", "grep", "cat", "printf")
GPU_LINE = "GPU 0: NVIDIA GeForce RTX 3090 (UUID: GPU-00000000-1111-2222-3333-444444444444)"


def _script(path, body: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return path


def _sandbox(tmp_path, *, nvcc_on_path=False, gpu=True):
    """A PATH with the shell tools, a fake nvidia-smi (a GPU line, or failing as it does
    without a driver) and, when asked, a fake nvcc; nothing of this machine's CUDA."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in MAKE_TOOLS:
        found = shutil.which(tool)
        if found:
            (bin_dir / tool).symlink_to(found)
    _script(bin_dir / "nvidia-smi",
            f"echo '{GPU_LINE}'" if gpu else "echo 'NVIDIA-SMI has failed' >&2; exit 9")
    if nvcc_on_path:
        _script(bin_dir / "nvcc", "echo 'Cuda compilation tools, release 12.4'")
    return bin_dir


def _decide(tmp_path, bin_dir, *args, cuda_home=None):
    """What the Makefile chose under that PATH: {variable: value}."""
    env = {k: v for k, v in os.environ.items() if k not in ("CMAKE_ARGS", "CUDA_HOME")}
    env["PATH"] = str(bin_dir)
    if cuda_home is not None:
        env["CUDA_HOME"] = str(cuda_home)
    make = shutil.which("make")
    return {name: subprocess.run([make, "-s", f"print-{name}", *args], cwd=REPO, env=env,
                                 check=True, capture_output=True, text=True,
                                 timeout=60).stdout.strip()
            for name in ("LLAMA_CMAKE_ARGS", "LLAMA_NVCC", "LLAMA_BUILD_PATH", "LLAMA_KEY")}


def test_cuda_is_chosen_with_nvcc_on_path_and_a_gpu(tmp_path):
    bin_dir = _sandbox(tmp_path, nvcc_on_path=True)
    chosen = _decide(tmp_path, bin_dir, f"CUDA_BIN_DIRS={tmp_path / 'none'}")
    # the flags (and so the key) of a CUDA build found on PATH are what they always were
    assert chosen["LLAMA_CMAKE_ARGS"] == "-DGGML_CUDA=on"
    assert chosen["LLAMA_NVCC"] == str(bin_dir / "nvcc")
    assert chosen["LLAMA_BUILD_PATH"] == ""
    assert chosen["LLAMA_KEY"] == _print(REPO, "LLAMA_KEY", "CMAKE_ARGS=-DGGML_CUDA=on")


def test_nvcc_off_path_is_found_under_cuda_home_and_named_to_cmake(tmp_path):
    """The lab's server over a non-login SSH shell: nvidia-smi works, nvcc is not on PATH
    but is in $CUDA_HOME/bin. The build is CUDA, CMake is told which nvcc, the key says so."""
    bin_dir = _sandbox(tmp_path)
    nvcc = _script(tmp_path / "cuda-12.4" / "bin" / "nvcc", "exit 0")
    chosen = _decide(tmp_path, bin_dir, cuda_home=tmp_path / "cuda-12.4")
    assert chosen["LLAMA_CMAKE_ARGS"] == f"-DGGML_CUDA=on -DCMAKE_CUDA_COMPILER={nvcc}"
    assert chosen["LLAMA_NVCC"] == str(nvcc)
    # (print-VAR echoes inside single quotes: the value's own quotes do not show)
    assert chosen["LLAMA_BUILD_PATH"] == f"PATH={nvcc.parent}/:\"$PATH\""
    on_path = _print(REPO, "LLAMA_KEY", "CMAKE_ARGS=-DGGML_CUDA=on")
    assert chosen["LLAMA_KEY"] != on_path and chosen["LLAMA_KEY"] != _print(
        REPO, "LLAMA_KEY", "CMAKE_ARGS=")
    # the key is the key of exactly those flags, as if given by hand
    assert chosen["LLAMA_KEY"] == _print(REPO, "LLAMA_KEY",
                                         f"CMAKE_ARGS={chosen['LLAMA_CMAKE_ARGS']}")


def test_nvcc_is_looked_for_in_usr_local_cuda_bin(tmp_path):
    dirs = _print(REPO, "CUDA_BIN_DIRS", "CUDA_HOME=/opt/cuda").split()
    assert dirs == ["/opt/cuda/bin", "/usr/local/cuda/bin"]  # CUDA_HOME first
    # the search itself, with a stand-in folder in place of /usr/local/cuda/bin
    bin_dir = _sandbox(tmp_path)
    nvcc = _script(tmp_path / "usr-local-cuda" / "bin" / "nvcc", "exit 0")
    chosen = _decide(tmp_path, bin_dir, f"CUDA_BIN_DIRS={tmp_path / 'missing'} {nvcc.parent}")
    assert chosen["LLAMA_CMAKE_ARGS"] == f"-DGGML_CUDA=on -DCMAKE_CUDA_COMPILER={nvcc}"


@pytest.mark.parametrize("nvcc,gpu", [(True, False), (False, True)])
def test_no_cuda_without_both_a_gpu_and_nvcc(tmp_path, nvcc, gpu):
    bin_dir = _sandbox(tmp_path, gpu=gpu)
    if nvcc:  # nvcc under CUDA_HOME, but nvidia-smi fails: no driver, no GPU
        _script(tmp_path / "cuda" / "bin" / "nvcc", "exit 0")
    chosen = _decide(tmp_path, bin_dir, f"CUDA_BIN_DIRS={tmp_path / 'cuda' / 'bin'}")
    assert chosen["LLAMA_CMAKE_ARGS"] == ""
    assert chosen["LLAMA_KEY"] == _print(REPO, "LLAMA_KEY", "CMAKE_ARGS=")


def test_the_build_runs_with_nvcc_on_its_path_for_flags_given_by_hand(tmp_path):
    """CMAKE_ARGS=-DGGML_CUDA=on by hand, nvcc only under CUDA_HOME: the flags stay the
    user's, and the compile sees nvcc on its PATH (CMake's own search finds it there)."""
    bin_dir = _sandbox(tmp_path)
    nvcc = _script(tmp_path / "cuda" / "bin" / "nvcc", "exit 0")
    env = {k: v for k, v in os.environ.items() if k != "CMAKE_ARGS"}
    env.update(PATH=str(bin_dir), CUDA_HOME=str(tmp_path / "cuda"))
    plan = subprocess.run([shutil.which("make"), "-n", "venv", f"VENV={tmp_path / 'v'}",
                           "CMAKE_ARGS=-DGGML_CUDA=on"], cwd=REPO, env=env, check=True,
                          capture_output=True, text=True, timeout=60).stdout
    build = next(line for line in plan.splitlines() if "CFLAGS=" in line)
    assert "CMAKE_ARGS='-DGGML_CUDA=on' " in build
    assert f"PATH='{nvcc.parent}/':\"$PATH\"" in build
    # what the shell running that line gives pip: nvcc first on PATH, the flags as given
    prefix = build.strip().split(" \\")[0]
    seen = subprocess.run(["bash", "-c", f'{prefix} bash -c \'command -v nvcc; printf %s '
                           '"$CMAKE_ARGS"\''], capture_output=True, text=True, check=True,
                          env={"PATH": f"{bin_dir}:/usr/bin:/bin"}).stdout.split("\n")
    assert seen == [str(nvcc), "-DGGML_CUDA=on"]
