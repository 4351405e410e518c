"""What kyara knows about each `backend:` kind before anything is loaded: which class serves
it, whether its model runs on this machine (then a worker process holds it), what to check
before loading, why this machine could not load it, and which variants are one copy of one
model. One class per kind, in `KINDS`; the rest of the project asks `kind_of(variant)`
instead of testing the variant's class.

Import-light on purpose (the console lists variants with it): no torch, no llama_cpp; the
backend classes are import strings, imported on first use by `registry.backend_class`.

A new backend is its config class (`pipelines/config/variants.py`, in the `Variant` union), its
ChatBackend module, and one `BackendKind` here.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any, ClassVar

from pipelines.inference.base import BackendError
from pipelines.inference.sources import resolve_path


class BackendKind:
    """One `backend:` value. Subclasses set the class attributes and override what differs."""

    name: ClassVar[str]
    target: ClassVar[str]       # its ChatBackend, "module:Class"
    local: ClassVar[bool]       # the model runs in this machine's memory (a worker holds it)

    def check(self, variant: Any, home: Path | None) -> None:
        """Before loading: a one-line BackendError for what is missing (a model file, an
        adapter); may make what the variant is made from (an embedded GGUF)."""

    def unloadable(self, variant: Any, home: Path | None) -> str | None:
        """Why this machine cannot load the variant (without the variant's name), or None.
        A cheap look: nothing loaded, nothing downloaded."""
        return None

    def shared_key(self, variant: Any, home: Path | None) -> tuple | None:
        """What decides whether two variants are one copy of one model in one process
        (None: not a local model, nothing to share)."""
        return None

    def base_name(self, variant: Any) -> str:
        """The name of the model a shared process holds, for its log: worker-<base>.log."""
        return variant.name


def _missing(value: str, what: str, home: Path | None) -> str | None:
    """`what not found: path` for a path that is absolute (or made so by the home) and
    absent; a relative path with no home given is not judged."""
    path = resolve_path(value, home)
    if not path.is_absolute() or path.exists():
        return None
    return f"{what} not found: {path}"


def _require(value: str, variant: str, what: str, home: Path | None) -> None:
    path = resolve_path(value, home)
    if not path.exists():
        raise BackendError(f"variant {variant!r}: {what} not found: {path}")


def _packaged(name: str) -> bool:
    """Whether the package that carries embedded model `name` is installed (the demo extra)."""
    from pipelines.inference.embedded import EMBEDDED

    module = EMBEDDED.get(name, ("",))[0]
    return bool(module) and importlib.util.find_spec(module) is not None


def cuda_visible() -> bool:
    """Whether a CUDA GPU is visible to this process, without importing torch: an NVIDIA
    device node exists and CUDA_VISIBLE_DEVICES does not hide every device."""
    devices = os.environ.get("CUDA_VISIBLE_DEVICES")
    if devices is not None and devices.strip() in ("", "-1"):
        return False
    return any(Path("/dev").glob("nvidia[0-9]*"))


class HFKind(BackendKind):
    name = "hf"
    target = "pipelines.inference.hf:HFBackend"
    local = True

    def check(self, variant: Any, home: Path | None) -> None:
        from pipelines.inference.sources import resolve_hf_model

        resolve_hf_model(variant.model, home, variant=variant.name)  # fails at once, one line
        if variant.adapter:
            _require(variant.adapter, variant.name, "adapter directory", home)

    def unloadable(self, variant: Any, home: Path | None) -> str | None:
        from pipelines.inference.embedded import dequantized_source
        from pipelines.inference.sources import cached_snapshot, is_hub_id

        reason: str | None = None
        if (variant.device == "cuda" or variant.load_in_4bit) and not cuda_visible():
            what = "load_in_4bit" if variant.load_in_4bit else "device: cuda"
            return f"{what} needs a CUDA GPU and none is visible"
        if (model := resolve_path(variant.model, home)).exists():
            reason = None
        elif is_hub_id(variant.model, home):
            if cached_snapshot(variant.model) is None:
                reason = f"model {variant.model} is not in the local Hugging Face cache"
        else:
            made = home is not None and dequantized_source(model, home)
            if not (made and _packaged(made)):
                reason = _missing(variant.model, "model folder", home)
        if reason is None and variant.adapter:
            reason = _missing(variant.adapter, "adapter directory", home)
        return reason

    def shared_key(self, variant: Any, home: Path | None) -> tuple:
        """hf._CACHE's key, computed without torch: the base model, dtype, device,
        attention, 4-bit, and torch's threads (one setting per process). The adapter is not
        in it: PEFT switches it per request on the one copy. A setting left to its default
        ("auto") is compared as written: `device: auto` and `device: cuda` do not share
        even where they resolve alike."""
        source = hf_source(variant.model, home)
        device = "cuda" if variant.load_in_4bit else variant.device
        dtype = "float32" if variant.dtype == "auto" and device == "cpu" else variant.dtype
        attn = variant.attn_implementation or _default_attention(source)
        threads = None if device == "cuda" else variant.n_threads
        return ("hf", source, dtype, device, attn, variant.load_in_4bit, threads)

    def base_name(self, variant: Any) -> str:
        # a folder or org/name: its last part
        return Path(str(variant.model).rstrip("/")).name or variant.name


class GGUFKind(BackendKind):
    name = "gguf"
    target = "pipelines.inference.gguf:GGUFBackend"
    local = True

    def check(self, variant: Any, home: Path | None) -> None:
        if variant.embedded:
            from pipelines.inference.embedded import ensure_embedded

            if home is None:
                raise BackendError(f"variant {variant.name!r}: an embedded model needs the "
                                   "kyara home to be assembled in")
            ensure_embedded(variant.embedded, home)
        else:
            _require(variant.path, variant.name, "model file", home)
        if variant.lora_path:
            _require(variant.lora_path, variant.name, "LoRA file", home)

    def unloadable(self, variant: Any, home: Path | None) -> str | None:
        from pipelines.inference.embedded import EMBEDDED, embedded_path

        if variant.embedded:
            assembled = home is not None and embedded_path(variant.embedded, home).exists()
            if not assembled and not _packaged(variant.embedded):
                return (f"the embedded model {variant.embedded!r} needs its package "
                        f"({EMBEDDED.get(variant.embedded, ('?',))[0]}, the demo extra)")
        elif reason := _missing(variant.path or "", "model file", home):
            return reason
        if variant.lora_path:
            return _missing(variant.lora_path, "LoRA file", home)
        return None

    def shared_key(self, variant: Any, home: Path | None) -> tuple:
        """gguf._SHARED's key: the model file, n_ctx, GPU layers and threads; the LoRA is
        set per request on the one Llama."""
        from pipelines.inference.embedded import embedded_path

        path = (embedded_path(variant.embedded, home) if variant.embedded and home is not None
                else resolve_path(variant.path or f"embedded:{variant.embedded}", home))
        file = str(path.resolve()) if path.exists() else str(path)
        return ("gguf", file, variant.n_ctx, variant.n_gpu_layers, variant.n_threads)

    def base_name(self, variant: Any) -> str:
        if variant.embedded:
            return variant.embedded
        return Path(variant.path or variant.name).stem


class OpenAIKind(BackendKind):
    """HTTP only: nothing is loaded here, nothing is shared; stays in the caller."""

    name = "openai"
    target = "pipelines.inference.openai_backend:OpenAIBackend"
    local = False

    def unloadable(self, variant: Any, home: Path | None) -> str | None:
        if variant.base_url is None and not os.environ.get(variant.api_key_env or ""):
            return f"set {variant.api_key_env} (the OpenAI API key)"
        return None


KINDS: dict[str, BackendKind] = {kind.name: kind() for kind in (HFKind, GGUFKind, OpenAIKind)}


def kind_of(variant: Any) -> BackendKind:
    try:
        return KINDS[variant.backend]
    except KeyError:
        raise BackendError(f"variant {variant.name!r}: unknown backend {variant.backend!r} "
                           f"(expected one of: {', '.join(KINDS)})") from None


def hf_source(value: str, home: Path | None) -> str:
    """An hf variant's model, as the parent can name it without making or fetching it: the
    resolved folder when it exists, a hub id's cached snapshot, else what was written."""
    from pipelines.inference.sources import cached_snapshot, is_hub_id

    path = resolve_path(value, home)
    if path.exists():
        return str(path.resolve())
    if is_hub_id(value, home):
        cached = cached_snapshot(value)
        return str(cached.resolve()) if cached is not None else value
    return str(path)


def _default_attention(source: str) -> str | None:
    """The loader's default (inference.loading.attention_for, which imports torch): eager
    for Gemma, else the model's own. Read from config.json; a hub id not cached: None."""
    try:
        config = json.loads((Path(source) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return "eager" if str(config.get("model_type") or "").startswith("gemma") else None
