"""Which class serves which `backend:` value, and what the backends share: path resolution
and the one-line error for a broken chat template.

The classes are named as import strings and imported on first use, so importing the
registry (the console does, to list variants) pulls in neither torch nor llama_cpp.
"""

from __future__ import annotations

import importlib
import os
import threading
from collections.abc import Sequence
from pathlib import Path

from pipelines.config import Variant
from pipelines.inference.base import BackendError, ChatBackend, Message
from pipelines.inference.kinds import KINDS, kind_of
from pipelines.prompting import TemplateError, render_prompt

BACKENDS: dict[str, str] = {name: kind.target for name, kind in KINDS.items()}


class ChatTemplateError(BackendError, TemplateError):
    """A chat template that cannot be rendered, raised by a backend: a BackendError for the
    console, a TemplateError for whoever asks about templates."""


ENV_BACKENDS = "KYARA_BACKEND_MODULES"


def backend_classes() -> dict[str, str]:
    """BACKENDS, with `KYARA_BACKEND_MODULES="kind=module:Class,..."` laid over it: how
    tests put a stand-in backend (one that crashes on purpose) behind a real variant,
    reachable from the worker processes the console starts."""
    classes = dict(BACKENDS)
    for item in filter(None, os.environ.get(ENV_BACKENDS, "").split(",")):
        kind, _, target = item.partition("=")
        if not kind or ":" not in target:
            raise BackendError(f"{ENV_BACKENDS}: expected kind=module:Class, found {item!r}")
        classes[kind.strip()] = target.strip()
    return classes


def backend_class(kind: str) -> type:
    classes = backend_classes()
    try:
        module_name, _, class_name = classes[kind].partition(":")
    except KeyError:
        raise BackendError(
            f"unknown backend {kind!r} (expected one of: {', '.join(BACKENDS)})"
        ) from None
    return getattr(importlib.import_module(module_name), class_name)


def load_backend(variant: Variant, home: Path) -> ChatBackend:
    """The backend for a variant, its model loaded. Every failure is a one-line BackendError."""
    kind = kind_of(variant)
    kind.check(variant, home)
    cls = backend_class(variant.backend)
    return cls(variant, home) if kind.local else cls(variant)


def render_for_model(
    template: str, messages: Sequence[Message], *, bos_token: str, eos_token: str, variant: str
) -> str:
    try:
        return render_prompt(template, messages, bos_token=bos_token, eos_token=eos_token)
    except TemplateError as exc:
        raise ChatTemplateError(f"variant {variant!r}: {exc}") from None


class GenerationLock:
    """One reply at a time on one loaded model. A second stream from the thread that holds
    the lock (two generators iterated side by side) would wait for itself forever: that is
    refused with a BackendError instead."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owner: int | None = None

    def __enter__(self) -> GenerationLock:
        me = threading.get_ident()
        if not self._lock.acquire(blocking=False):
            if self._owner == me:
                raise BackendError(
                    "this model is already generating a reply in this thread: "
                    "finish or close that stream first"
                )
            self._lock.acquire()
        self._owner = me
        return self

    def __exit__(self, *exc: object) -> None:
        self._owner = None
        self._lock.release()
