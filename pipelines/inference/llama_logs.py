"""llama.cpp's own log lines into Python logging: one place for every user of llama_cpp
(the GGUF backend, the local judge, export verification)."""

from __future__ import annotations

import ctypes
import logging
from typing import Any

log = logging.getLogger("kyara.llama_cpp")
# The installed callback, kept referenced: llama.cpp holds a raw pointer to it.
_log_callback: list = []


def route_llama_logs(llama_cpp: Any) -> None:
    """Send llama.cpp's own log lines (it writes some to stderr even with verbose=False,
    e.g. the SWA cache notice) to Python logging at debug level: a Textual screen or the
    stdout of `kyara ask` must not be scribbled over. Failures reach the user as
    BackendError from the exceptions llama-cpp-python raises. Idempotent."""
    if _log_callback:
        return

    @llama_cpp.llama_log_callback
    def callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        log.debug("%s", text.decode("utf-8", errors="replace").rstrip())

    _log_callback.append(callback)
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
