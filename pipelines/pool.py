"""The loaded backends of a console or a command, by variant name: the one owner.

Chat, compare and blind A/B ask the same pool: `get(variant)` loads a variant's backend on
first use through the pool's loader (`registry.spawn_backend` in the console and
`kyara ask`) and keeps it, so switching variants keeps the others loaded and a comparison
on a variant the chat already uses loads nothing. A load that fails raises its
`BackendError` (one line; the turn records it) and caches nothing, so the next turn tries
again. `close()` closes each loaded backend once, when the console or command ends.
Textual-free and torch-free: nothing here loads a model itself.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from pipelines.config import Variant
from pipelines.inference.base import BackendError, ChatBackend

Loader = Callable[[Variant], ChatBackend]


class BackendPool:
    def __init__(self, loader: Loader | None = None) -> None:
        self.loader = loader  # Variant -> a loaded ChatBackend (blocking); None: adopt only
        self._loaded: dict[str, ChatBackend] = {}
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}  # one load per variant at a time

    def __contains__(self, name: str) -> bool:
        return name in self._loaded

    def loaded(self, name: str) -> ChatBackend | None:
        """The variant's backend when it is loaded, else None (nothing is loaded)."""
        return self._loaded.get(name)

    def adopt(self, name: str, backend: ChatBackend) -> None:
        """A backend loaded elsewhere (a test's, a caller's) serves `name` from now on."""
        with self._lock:
            self._loaded[name] = backend

    def get(self, variant: Variant) -> ChatBackend:
        """The variant's backend, loaded on first use (BackendError when it cannot be)."""
        backend = self._loaded.get(variant.name)
        if backend is not None:
            return backend
        with self._lock:
            gate = self._loading.setdefault(variant.name, threading.Lock())
        with gate:  # two callers asking for one variant load it once
            backend = self._loaded.get(variant.name)
            if backend is None:
                if self.loader is None:
                    raise BackendError(f"variant {variant.name!r}: no backend loaded and "
                                       "nothing to load one with")
                backend = self.loader(variant)  # may raise BackendError: nothing cached
                with self._lock:
                    self._loaded[variant.name] = backend
            return backend

    def close(self) -> None:
        """Close each loaded backend once (a backend serving two names too); a backend
        that fails to close does not keep the others open. A later `get` loads again."""
        with self._lock:
            backends = list({id(b): b for b in self._loaded.values()}.values())
            self._loaded.clear()
        for backend in backends:
            try:
                backend.close()
            except Exception:
                pass
