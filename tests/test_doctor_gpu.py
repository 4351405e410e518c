"""`kyara doctor` on a machine whose GPU llama.cpp cannot use (issue 24): nvidia-smi lists
a GPU, the installed llama-cpp-python has no GPU offload. Against this machine's real CPU
build, with a stand-in nvidia-smi (a script printing a GPU line) and nvcc on a test PATH."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

from pipelines import doctor
from tests.conftest import run_kyara

GPU_LINE = "GPU 0: NVIDIA GeForce RTX 3090 (UUID: GPU-00000000-1111-2222-3333-444444444444)"


def script(path, body: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return path


@pytest.fixture
def cpu_build():
    llama_cpp = pytest.importorskip("llama_cpp")
    if llama_cpp.llama_supports_gpu_offload():
        pytest.skip("this llama.cpp offloads to a GPU: the warning is for CPU builds")
    return llama_cpp


@pytest.fixture
def gpu_path(tmp_path, monkeypatch):
    """PATH holding a nvidia-smi that lists one GPU, and nothing else (no nvcc)."""
    bin_dir = tmp_path / "bin"
    script(bin_dir / "nvidia-smi", f"echo '{GPU_LINE}'")
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.setattr(doctor, "DEFAULT_CUDA_BIN", str(tmp_path / "no-cuda" / "bin"))
    return bin_dir


def test_a_gpu_and_a_cpu_build_warn_with_the_rebuild_line(cpu_build, gpu_path, tmp_path,
                                                          monkeypatch):
    nvcc = script(tmp_path / "cuda-12.4" / "bin" / "nvcc", "exit 0")
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "cuda-12.4"))
    check = doctor.check_gpu_offload()
    assert check is not None and check.status == "warn" and not check.required
    assert "NVIDIA GeForce RTX 3090" in check.detail and "no GPU offload" in check.detail
    assert f"nvcc at {nvcc}" in check.detail
    # the flags the Makefile picks for an nvcc off PATH, so a later `make` keeps the build
    assert check.detail.endswith(
        f'rebuild: make rebuild-llama CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_COMPILER={nvcc}"')


def test_nvcc_in_usr_local_cuda_bin_is_found(cpu_build, gpu_path, tmp_path, monkeypatch):
    nvcc = script(tmp_path / "usr-local-cuda" / "bin" / "nvcc", "exit 0")
    monkeypatch.setattr(doctor, "DEFAULT_CUDA_BIN", str(nvcc.parent))
    check = doctor.check_gpu_offload()
    assert f"-DCMAKE_CUDA_COMPILER={nvcc}" in check.detail


def test_without_nvcc_the_line_says_to_install_the_toolkit(cpu_build, gpu_path):
    check = doctor.check_gpu_offload()
    assert check.status == "warn"
    assert "no nvcc on PATH, in $CUDA_HOME/bin" in check.detail
    assert "install the CUDA toolkit (nvcc) or set CUDA_HOME" in check.detail
    assert 'make rebuild-llama CMAKE_ARGS="-DGGML_CUDA=on"' in check.detail


def test_a_gpu_build_is_ok(gpu_path):
    gpu_build = SimpleNamespace(llama_supports_gpu_offload=lambda: True)
    check = doctor.check_gpu_offload(gpu_build)
    assert check.status == "ok" and "NVIDIA GeForce RTX 3090" in check.detail


@pytest.mark.parametrize("smi", [None, "echo 'NVIDIA-SMI has failed' >&2; exit 9"],
                         ids=["no nvidia-smi", "nvidia-smi fails"])
def test_no_gpu_no_warning(cpu_build, tmp_path, monkeypatch, smi):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if smi:
        script(bin_dir / "nvidia-smi", smi)
    monkeypatch.setenv("PATH", str(bin_dir))
    assert doctor.visible_gpus() == []
    assert doctor.check_gpu_offload() is None


def test_kyara_doctor_prints_the_warning(cpu_build, tmp_path):
    """The command itself, nvidia-smi and nvcc first on PATH: the row and the rebuild line;
    a warning, not a failure (doctor still exits 0)."""
    bin_dir = tmp_path / "bin"
    script(bin_dir / "nvidia-smi", f"echo '{GPU_LINE}'")
    script(bin_dir / "nvcc", "exit 0")
    proc = run_kyara("doctor", timeout=300,
                     env={"PATH": f"{bin_dir}:{os.environ['PATH']}", "OPENAI_API_KEY": "x"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = " ".join(proc.stdout.split())
    assert "llama.cpp GPU warn nvidia-smi sees NVIDIA GeForce RTX 3090" in text
    assert 'rebuild: make rebuild-llama CMAKE_ARGS="-DGGML_CUDA=on"' in text


@pytest.mark.slow  # a second whole doctor run (~35 s); the check itself is tested above
def test_kyara_doctor_without_nvidia_smi_has_no_warning(cpu_build, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    path = ":".join(p for p in [str(bin_dir), *os.environ["PATH"].split(":")]
                    if not os.path.exists(os.path.join(p, "nvidia-smi")))
    proc = run_kyara("doctor", timeout=300, env={"PATH": path, "OPENAI_API_KEY": "x"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "llama.cpp GPU" not in proc.stdout and "rebuild-llama" not in proc.stdout
