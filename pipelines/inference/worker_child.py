"""The child side of a model worker (`pipelines.inference.worker`, whose module docstring
gives the protocol): started as `python -m pipelines.inference.worker`, it reads requests on
its stdin, answers on a private copy of its stdout (fd 1 itself is pointed at stderr, the
log), and serves the backends loaded under their handles, one request at a time (a stream
holds it until its last line; a cancel is read meanwhile). It builds each backend with the
function its load names by import string (`load_chat_backend` here; the local judge's
`judge.providers.load_local_judge`). Nothing of the parent side is imported here.
"""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from pipelines.inference.base import BackendError, GenerationOptions


class _Channel:
    """The child's end: replies on a private copy of the original stdout."""

    def __init__(self) -> None:
        out_fd = os.dup(1)
        os.dup2(2, 1)  # native prints (llama.cpp, torch) go to the log, not the protocol
        sys.stdout = sys.stderr
        self._out = os.fdopen(out_fd, "wb", buffering=0)
        self._lock = threading.Lock()

    def send(self, message: dict[str, Any]) -> None:
        data = (json.dumps(message, ensure_ascii=False) + "\n").encode()
        with self._lock:
            self._out.write(data)


# fields of an exception that travel with its one line (ProviderError's, for the judge)
ERROR_FIELDS = ("kind", "retryable", "retry_after", "fatal")


def _error(rid: Any, exc: BaseException) -> dict[str, Any]:
    fields = {f: getattr(exc, f) for f in ERROR_FIELDS
              if isinstance(getattr(exc, f, None), (str, int, float, bool))}
    return {"id": rid, "error": " ".join(str(exc).split()) or type(exc).__name__,
            "type": type(exc).__name__, "fields": fields}


def load_chat_backend(variant: dict[str, Any], home: str | None) -> tuple[Any, dict[str, Any]]:
    """The child's model for a WorkerBackend: the variant's backend, loaded in process."""
    from pipelines.config import parse_variant
    from pipelines.inference.registry import load_backend

    backend = load_backend(parse_variant(variant, "the console"),
                           Path(home) if home else None)
    info: dict[str, Any] = {}
    for key in ("settings", "n_threads"):
        if getattr(backend, key, None) is not None:
            info[key] = getattr(backend, key)
    return backend, info


def _load(request: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """`target` is "module:function", called with `args`; it returns (object, info)."""
    import importlib

    module, _, function = request["target"].partition(":")
    target, info = getattr(importlib.import_module(module), function)(**request["args"])
    return target, {"pid": os.getpid(), **info}


def _close_target(target: Any) -> None:
    close = getattr(target, "close", None) or getattr(target, "unload", None)
    if close is not None:
        close()


def _serve(channel: _Channel, targets: dict[str, Any], default: str, requests: queue.Queue,
           cancelled: set[int]) -> None:
    while True:
        request = requests.get()
        if request is None or request.get("op") == "exit":
            return
        rid, op = request.get("id"), request.get("op")
        try:
            if op == "load":  # one more backend in this process, under its handle
                handle = request["handle"]
                target, info = _load(request)
                old = targets.pop(handle, None)
                targets[handle] = target
                if old is not None:
                    _close_target(old)
                channel.send({"id": rid, "result": info})
                continue
            if op == "unload":
                old = targets.pop(request["handle"], None)
                if old is not None:
                    _close_target(old)
                channel.send({"id": rid, "result": None})
                continue
            handle = request.get("handle") or default
            target = targets.get(handle)
            if target is None:
                raise BackendError(f"nothing is loaded under {handle!r} in this process")
            if op == "render":
                channel.send({"id": rid, "result": target.render(request["messages"])})
            elif op == "call":  # a method whose result is JSON-able
                method = getattr(target, request["method"])
                channel.send({"id": rid, "result": method(**request.get("args", {}))})
            elif op == "stream":
                _stream(channel, target, rid, request, cancelled)
            else:
                channel.send({"id": rid, "error": f"unknown request {op!r}"})
        except Exception as exc:
            import traceback

            traceback.print_exc()  # to the log
            channel.send({**_error(rid, exc), "end": True} if op == "stream"
                         else _error(rid, exc))


def _stream(channel: _Channel, backend: Any, rid: int, request: dict[str, Any],
            cancelled: set[int]) -> None:
    options = GenerationOptions(**request["options"])
    steps = backend.stream(request["messages"], options)
    try:
        for delta in steps:
            if rid in cancelled:
                break
            channel.send({"id": rid, "delta": dataclasses.asdict(delta)})
    finally:
        steps.close()  # on cancel: the backend stops within one token
    cancelled.discard(rid)
    channel.send({"id": rid, "end": True})


def main() -> int:
    from pipelines.processes import private

    private()  # umask 077: logs and anything the model writes are this user's alone
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C is the parent's to handle
    channel = _Channel()
    requests: queue.Queue = queue.Queue()
    cancelled: set[int] = set()

    def read() -> None:
        for raw in sys.stdin.buffer:
            try:
                request = json.loads(raw)
            except ValueError:
                continue
            if request.get("op") == "cancel":
                cancelled.add(request.get("id"))
            else:
                requests.put(request)
        # stdin closed: the parent is gone or done. Stop; a native call that does not
        # return (a long prompt) is not waited for.
        requests.put(None)
        timer = threading.Timer(5.0, os._exit, args=(0,))
        timer.daemon = True
        timer.start()

    first = sys.stdin.buffer.readline()
    try:
        request = json.loads(first)
        target, info = _load(request)
    except BaseException as exc:
        if not isinstance(exc, BackendError):
            import traceback

            traceback.print_exc()
        channel.send({"error": " ".join(str(exc).split()) or type(exc).__name__})
        return 1
    default = request.get("handle") or "main"
    targets = {default: target}
    channel.send({"ok": True, "info": info})
    threading.Thread(target=read, daemon=True).start()
    try:
        _serve(channel, targets, default, requests, cancelled)
    except BrokenPipeError:
        return 0
    finally:
        for target in list(targets.values()):
            _close_target(target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
