"""Models in their own process: a native crash, CUDA out of memory, the OOM killer or a
`kill -9` ends that process, never the console or `kyara ask`.

One child process per loaded model (`python -m pipelines.inference.worker`), speaking JSON
Lines: requests on its stdin, replies on a private copy of its stdout (fd 1 itself is
pointed at stderr, so whatever llama.cpp or torch print cannot break the protocol; stderr
goes to `<home>/logs/worker-<name>.log`). The child builds its model with a function named
by import string, with the same in-process code the jobs use (`registry.load_backend`;
the local judge's `LlamaCppProvider`), so what runs there is what the tests of those
classes prove, and this module depends on nothing above it.

Requests, one at a time per process (a stream holds the process until its last line):
  {"op": "load", "target": "module:function", "args": {...}} -> {"ok": true, "info": {...}}
  {"id": n, "op": "render", "messages": [...]}     -> {"id": n, "result": "<prompt text>"}
  {"id": n, "op": "stream", "messages", "options"} -> {"id": n, "delta": {...}} ... {"id": n, "end": true}
  {"id": n, "op": "cancel"}                        (read while streaming; the stream ends)
  {"id": n, "op": "call", "method": m, "args": {}} -> {"id": n, "result": <JSON>}
Any request can answer {"id": n, "error": "one line", "type": "BackendError", "fields": {}}.

The parent side (`ModelProcess`, `WorkerBackend`; the judge's `WorkerProvider`) turns the
child's death into one BackendError line (the variant, the signal or exit code, what to
try) and starts a fresh child on the next request.

Why not multiprocessing: a spawned child re-imports the parent's __main__ (the console),
and a pipe of pickles would still need the same death handling; a subprocess with JSON
Lines keeps the child's imports to exactly what the model needs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from pipelines.inference.base import BackendError, Delta, GenerationOptions, Message

CANCEL_GRACE_S = 10.0  # a cancelled stream must end this soon, or its process is killed
_END = object()

# --- the parent side ----------------------------------------------------------------------


class WorkerDied(BackendError):
    """The model's process ended while a request was in flight (or before it started)."""


def death_line(label: str, returncode: int | None, doing: str, log_path: Path | None) -> str:
    """One line for a dead worker: which model, how it died, what to try."""
    tail = last_log_line(log_path)
    if returncode is not None and returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        how = f"killed by {name}"
    else:
        how = f"exit code {returncode}"
    if tail and ("out of memory" in tail.lower() or "cudaMalloc" in tail):
        hint = f"out of GPU memory ({tail[:120]}): close other variants or lower n_ctx"
    elif returncode == -signal.SIGKILL:
        hint = ("the OOM killer or kill -9: check free memory (free -h), close other "
                "variants, or use a smaller model or n_ctx")
    elif returncode is not None and -returncode in (signal.SIGSEGV, signal.SIGILL,
                                                     signal.SIGBUS, signal.SIGABRT):
        hint = ("a native crash in the model's engine: run `kyara doctor`; "
                "rebuild llama.cpp for this CPU with `make rebuild-llama`")
    else:
        hint = f"last log line: {tail[:160]}" if tail else "see the log"
    where = f" (log: {log_path})" if log_path else ""
    return (f"{label}: the model process died while {doing} ({how}; {hint}); "
            f"the next message starts a fresh one{where}")


def last_log_line(path: Path | None) -> str:
    if path is None:
        return ""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 4096))
            lines = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return ""
    for line in reversed(lines):
        if line.strip():
            return " ".join(line.split())
    return ""


class ModelProcess:
    """One child process and the one request it serves at a time."""

    def __init__(self, load: dict[str, Any], label: str, log_path: Path | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.load_request = {"op": "load", **load}
        self.label = label
        self.log_path = log_path
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.info: dict[str, Any] = {}
        self._replies: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._owner: int | None = None
        self._next_id = 0

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self) -> dict[str, Any]:
        """Start the child and load the model; BackendError (one line) when it cannot."""
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            log = open(self.log_path, "ab")
        else:
            log = subprocess.DEVNULL
        env = dict(os.environ if self.env is None else self.env)
        # the repository (or installed package) first, whatever the caller's cwd is
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        env.setdefault("PYTHONUNBUFFERED", "1")
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pipelines.inference.worker"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, env=env,
                close_fds=True,
            )
        except OSError as exc:
            raise BackendError(f"{self.label}: cannot start the model process: {exc}") from None
        finally:
            if log is not subprocess.DEVNULL:
                log.close()
        self._replies = queue.Queue()
        threading.Thread(target=self._read, args=(self.proc, self._replies), daemon=True,
                         name=f"kyara-worker-{self.proc.pid}").start()
        self._send(self.load_request)
        reply = self._get("loading the model")
        if "error" in reply:
            self.close()
            raise BackendError(reply["error"])
        self.info = reply.get("info") or {}
        return self.info

    @staticmethod
    def _read(proc: subprocess.Popen, replies: queue.Queue) -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            try:
                replies.put(json.loads(raw))
            except ValueError:
                continue  # not ours: nothing else writes here, but never die on it
        proc.wait()
        replies.put(_END)

    def _send(self, message: dict[str, Any]) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        try:
            self.proc.stdin.write((json.dumps(message, ensure_ascii=False) + "\n").encode())
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError, ValueError):
            pass  # the child is gone: the reader reports how when its output ends

    def _get(self, doing: str, timeout: float | None = None) -> dict[str, Any]:
        item = self._replies.get(timeout=timeout)
        if item is _END:
            self._replies.put(_END)  # every later read sees the death too
            code = self.proc.returncode if self.proc is not None else None
            raise WorkerDied(death_line(self.label, code, doing, self.log_path))
        return item

    def _acquire(self) -> None:
        me = threading.get_ident()
        if not self._lock.acquire(blocking=False):
            if self._owner == me:
                raise BackendError("this model is already generating a reply in this thread: "
                                   "finish or close that stream first")
            self._lock.acquire()
        self._owner = me

    def _release(self) -> None:
        self._owner = None
        self._lock.release()

    def request(self, op: str, doing: str, **args: Any) -> Any:
        self._acquire()
        try:
            self._next_id += 1
            rid = self._next_id
            self._send({"id": rid, "op": op, **args})
            reply = self._get(doing)
            if "error" in reply:
                raise remote_error(reply)
            return reply.get("result")
        finally:
            self._release()

    def stream(self, op: str, doing: str, **args: Any) -> Iterator[dict[str, Any]]:
        """The child's lines for one streamed request. Closing the generator cancels the
        request in the child and waits (CANCEL_GRACE_S at most) for its end, so the next
        request starts clean; a child that does not end by then is killed."""
        self._acquire()
        rid = None
        ended = False
        try:
            self._next_id += 1
            rid = self._next_id
            self._send({"id": rid, "op": op, **args})
            while True:
                reply = self._get(doing)
                if reply.get("end"):
                    ended = True
                    return
                if "error" in reply:  # a stream's error is also its end
                    ended = True
                    raise remote_error(reply)
                yield reply
        except WorkerDied:
            ended = True
            raise
        finally:
            if not ended and rid is not None and self.alive:
                self._send({"id": rid, "op": "cancel"})
                self._drain()
            self._release()

    def _drain(self) -> None:
        """Read up to the end of the request in flight; kill a child that does not get
        there within CANCEL_GRACE_S."""
        try:
            while not self._get("cancelling", timeout=CANCEL_GRACE_S).get("end"):
                pass
        except queue.Empty:
            self.kill()
        except WorkerDied:
            pass

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def close(self) -> None:
        """Ask the child to exit (the model is freed with it); kill it if it will not."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        try:
            self._send({"op": "exit"})
            if proc.stdin is not None:
                proc.stdin.close()
            proc.wait(timeout=5)
        except (subprocess.TimeoutExpired, OSError):
            self.kill()


class RemoteError(BackendError):
    """An exception the child reported: its one line, and its type name and fields, so a
    caller that knows the type can raise its own (the local judge: ProviderError)."""

    def __init__(self, message: str, kind: str | None, fields: dict[str, Any]) -> None:
        super().__init__(message)
        self.kind = kind
        self.fields = fields


def remote_error(reply: dict[str, Any]) -> RemoteError:
    return RemoteError(reply.get("error") or "the model process failed", reply.get("type"),
                       reply.get("fields") or {})


def worker_log(home: Path | None, name: str) -> Path | None:
    if home is None:
        return None
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    return Path(home) / "logs" / f"worker-{safe}.log"


class WorkerBackend:
    """A ChatBackend whose model lives in a child process (see the module's docstring).
    The model is loaded when this object is made, so load errors surface where they did
    in process; after a death, the next render or stream starts a fresh child."""

    def __init__(self, variant: Any, home: Path | None, *, env: dict[str, str] | None = None
                 ) -> None:
        self.variant = variant
        self.name = variant.name
        self.home = Path(home) if home is not None else None
        self.label = f"variant {variant.name!r}"
        self._load = {"target": "pipelines.inference.worker:load_chat_backend",
                      "args": {"variant": variant.model_dump(mode="json"),
                               "home": str(self.home) if self.home is not None else None}}
        self._env = env
        self.last: Delta | None = None
        self._start_lock = threading.Lock()  # the chat and a comparison may both restart it
        self.process = self._start()

    def _start(self) -> ModelProcess:
        process = ModelProcess(self._load, self.label, worker_log(self.home, self.name),
                               self._env)
        process.start()
        return process

    @property
    def info(self) -> dict[str, Any]:
        return self.process.info

    def _ready(self) -> ModelProcess:
        with self._start_lock:
            if not self.process.alive:
                self.process = self._start()
            return self.process

    def render(self, messages: Sequence[Message]) -> str:
        return self._ready().request("render", "rendering the prompt", messages=list(messages))

    def stream(self, messages: Sequence[Message], options: GenerationOptions) -> Iterator[Delta]:
        lines = self._ready().stream("stream", "generating a reply", messages=list(messages),
                                     options=options.as_dict())
        try:
            for line in lines:
                delta = Delta(**line["delta"])
                if delta.done:
                    self.last = delta
                yield delta
        finally:
            lines.close()  # a consumer that stopped early cancels the child's generation

    def close(self) -> None:
        self.process.close()


def spawn_backend(variant: Any, home: Path) -> Any:
    """The backend the console and `kyara ask` use: a local model (hf, gguf) in its own
    worker process, so a native crash or the OOM killer ends that process, not theirs; a
    remote one (openai: HTTP only) in this process."""
    from pipelines.config import GGUFVariant, HFVariant
    from pipelines.inference.registry import load_backend

    if isinstance(variant, (GGUFVariant, HFVariant)):
        return WorkerBackend(variant, home)
    return load_backend(variant, home)


# --- the child side -----------------------------------------------------------------------


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


def _serve(channel: _Channel, target: Any, requests: queue.Queue,
           cancelled: set[int]) -> None:
    while True:
        request = requests.get()
        if request is None or request.get("op") == "exit":
            return
        rid, op = request.get("id"), request.get("op")
        try:
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
        target, info = _load(json.loads(first))
    except BaseException as exc:
        if not isinstance(exc, BackendError):
            import traceback

            traceback.print_exc()
        channel.send({"error": " ".join(str(exc).split()) or type(exc).__name__})
        return 1
    channel.send({"ok": True, "info": info})
    threading.Thread(target=read, daemon=True).start()
    try:
        _serve(channel, target, requests, cancelled)
    except BrokenPipeError:
        return 0
    finally:
        close = getattr(target, "close", None) or getattr(target, "unload", None)
        if close is not None:
            close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
