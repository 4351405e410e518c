"""Models in their own process: a native crash, CUDA out of memory, the OOM killer or a
`kill -9` ends that process, never the console or `kyara ask`.

One child process per loaded base model (`python -m pipelines.inference.worker`), speaking
JSON Lines: requests on its stdin, replies on a private copy of its stdout (fd 1 itself is
pointed at stderr, so whatever llama.cpp or torch print cannot break the protocol; stderr
goes to `<home>/logs/worker-<base>.log`). The child builds each backend with a function
named by import string, with the same in-process code the jobs use
(`registry.load_backend`; the local judge's `LlamaCppProvider`), so what runs there is
what the tests of those classes prove, and this module depends on nothing above it.

Several backends can live in one child, each under a handle: variants that share a base
model and differ by an adapter (`shared_model_key`) are one child, and the in-process
caches of the backends (hf: one copy and PEFT adapters switched per request; gguf: one
`Llama` and LoRA adapters switched per request) make them one copy of the base there.

Requests, one at a time per process (a stream holds the process until its last line):
  {"op": "load", "handle": h, "target": "module:function", "args": {...}}
                                                   -> {"ok": true, "info": {...}} (first line)
  {"id": n, "op": "load", "handle": h, "target", "args"} -> {"id": n, "result": {info}}
  {"id": n, "op": "unload", "handle": h}           -> {"id": n, "result": null}
  {"id": n, "op": "render", "handle": h, "messages": [...]} -> {"id": n, "result": "<prompt>"}
  {"id": n, "op": "stream", "handle": h, "messages", "options"}
                                  -> {"id": n, "delta": {...}} ... {"id": n, "end": true}
  {"id": n, "op": "cancel"}                        (read while streaming; the stream ends)
  {"id": n, "op": "call", "handle": h, "method": m, "args": {}} -> {"id": n, "result": <JSON>}
Without "handle", a request goes to the first backend loaded. Any request can answer
{"id": n, "error": "one line", "type": "BackendError", "fields": {}}.

The parent side (`ModelProcess`, `WorkerBackend`; the judge's `WorkerProvider`) turns the
child's death into one BackendError line (the variant whose request was in flight, the
others that child served, the signal or exit code, what to try) for every request in
flight or waiting on it, and the next request starts a fresh child with every backend
attached to it loaded again. A shared child ends when the last WorkerBackend on it closes.
This module is the parent side; the child's loop is `worker_child.py`, which
`python -m pipelines.inference.worker` runs.

Why not multiprocessing: a spawned child re-imports the parent's __main__ (the console),
and a pipe of pickles would still need the same death handling; a subprocess with JSON
Lines keeps the child's imports to exactly what the model needs.
"""

from __future__ import annotations

import itertools
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

from pipelines.home import Home
from pipelines.inference.base import BackendError, Delta, GenerationOptions, Message
from pipelines.inference.registry import ENV_BACKENDS

RENDER_TIMEOUT_S = 30.0  # a render request the child has not answered by then: it is stopped
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


DEFAULT_HANDLE = "main"  # the handle of a process made with one load (the local judge's)


class ModelProcess:
    """One child process, the backends loaded in it (one per handle), and the one request
    it serves at a time. After a death, `ensure` starts a fresh child and loads every
    handle again."""

    def __init__(self, load: dict[str, Any] | None, label: str, log_path: Path | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.label = label
        self.log_path = log_path
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.loads: dict[str, dict[str, Any]] = {}  # handle -> {"target", "args"}
        self.labels: dict[str, str] = {}  # handle -> "variant 'x'", for its error lines
        self.infos: dict[str, dict[str, Any]] = {}  # handle -> what its load answered
        self._loaded: set[str] = set()  # the handles the current child has loaded
        if load is not None:
            self.loads[DEFAULT_HANDLE] = dict(load)
            self.labels[DEFAULT_HANDLE] = label
        self._replies: queue.Queue = queue.Queue()
        self._lock = threading.Lock()  # one request at a time
        self._owner: int | None = None
        self._start_lock = threading.RLock()  # one start or load at a time
        self._next_id = 0

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def info(self) -> dict[str, Any]:
        return self.infos.get(DEFAULT_HANDLE) or next(iter(self.infos.values()), {})

    def start(self, first: str | None = None) -> dict[str, Any]:
        """Start a child and load every handle in it, `first` first; BackendError (one line)
        when `first` cannot load. Another handle that fails is left unloaded: its own next
        request loads it again and says why."""
        handles = sorted(self.loads, key=lambda h: h != first)
        if not handles:
            raise BackendError(f"{self.label}: nothing to load in the model process")
        head = handles[0]
        with self._start_lock:
            self._acquire()  # no request of the previous child is still reading its replies
            try:
                self._spawn()
                self._send({"op": "load", "handle": head, **self.loads[head]})
                reply = self._get("loading the model", self.labels.get(head))
                if "error" in reply:
                    self._close_child()
                    raise BackendError(reply["error"])
                self.infos[head] = reply.get("info") or {}
                self._loaded = {head}
            finally:
                self._release()
            for handle in handles[1:]:
                try:
                    self._load_handle(handle)
                except WorkerDied:
                    raise
                except BackendError:
                    pass
            return self.infos[head]

    def _spawn(self) -> None:
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            log = open(self.log_path, "ab")
        else:
            log = subprocess.DEVNULL
        # the repository (or installed package) first, whatever the caller's cwd is, and
        # nothing from that cwd (pipelines.processes)
        from pipelines.processes import child_env, python

        env = child_env(self.env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        try:
            self.proc = subprocess.Popen(
                python("-m", "pipelines.inference.worker"),
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, env=env,
                close_fds=True,
            )
        except OSError as exc:
            raise BackendError(f"{self.label}: cannot start the model process: {exc}") from None
        finally:
            if log is not subprocess.DEVNULL:
                log.close()
        self._replies = queue.Queue()
        self._loaded = set()
        threading.Thread(target=self._read, args=(self.proc, self._replies), daemon=True,
                         name=f"kyara-worker-{self.proc.pid}").start()

    def _load_handle(self, handle: str) -> None:
        info = self.request("load", "loading the model", label=self.labels.get(handle),
                            handle=handle, **self.loads[handle])
        self.infos[handle] = info or {}
        self._loaded.add(handle)

    def ensure(self, handle: str = DEFAULT_HANDLE) -> None:
        """A live child with `handle` loaded: a fresh child (every handle loaded again) after
        a death; BackendError when `handle` cannot load."""
        with self._start_lock:
            if not self.alive:
                self.start(first=handle)
            elif handle not in self._loaded:
                self._load_handle(handle)

    def attach(self, handle: str, load: dict[str, Any], label: str) -> dict[str, Any]:
        """Load one more backend in this process (starting it if need be); its info."""
        with self._start_lock:
            self.loads[handle] = dict(load)
            self.labels[handle] = label
        self.ensure(handle)
        return self.infos[handle]

    def detach(self, handle: str) -> bool:
        """Unload one backend; the child exits with the last. True when none is left."""
        with self._start_lock:
            self.loads.pop(handle, None)
            self.labels.pop(handle, None)
            self.infos.pop(handle, None)
            loaded = handle in self._loaded
            self._loaded.discard(handle)
            if not self.loads:
                self.close()
                return True
        if loaded and self.alive:
            try:  # frees its share in the child (an adapter's users, a model no one else uses)
                self.request("unload", "unloading a variant", handle=handle)
            except BackendError:
                pass  # a dead child frees everything anyway
        return False

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

    def _get(self, doing: str, label: str | None = None,
             timeout: float | None = None) -> dict[str, Any]:
        item = self._replies.get(timeout=timeout)
        if item is _END:
            self._replies.put(_END)  # every later read sees the death too
            code = self.proc.returncode if self.proc is not None else None
            raise WorkerDied(death_line(self._who(label), code, doing, self.log_path))
        return item

    def _who(self, label: str | None) -> str:
        """The variant whose request was in flight, and the others that process served."""
        label = label or self.label
        others = sorted({v for v in self.labels.values() if v != label})
        if not others:
            return label
        return f"{label} (its model process also served {', '.join(others)})"

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

    def request(self, op: str, doing: str, label: str | None = None,
                timeout: float | None = None, **args: Any) -> Any:
        """One request and its reply. With `timeout`, a child that has not answered by then
        is killed (its state is unknown) and the request is one BackendError line; the next
        request starts a fresh child."""
        self._acquire()
        try:
            self._next_id += 1
            rid = self._next_id
            self._send({"id": rid, "op": op, **args})
            try:
                reply = self._get(doing, label, timeout=timeout)
            except queue.Empty:
                self.kill()
                raise BackendError(f"{self._who(label)}: the model process did not answer "
                                   f"within {timeout:g} s while {doing}; it was stopped, and "
                                   "the next message starts a fresh one") from None
            if "error" in reply:
                raise remote_error(reply)
            return reply.get("result")
        finally:
            self._release()

    def stream(self, op: str, doing: str, label: str | None = None,
               **args: Any) -> Iterator[dict[str, Any]]:
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
                reply = self._get(doing, label)
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
        """Ask the child to exit (its models are freed with it); kill it if it will not."""
        self._close_child()

    def _close_child(self) -> None:
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
    return Home(home).logs / f"worker-{safe}.log"


class WorkerBackend:
    """A ChatBackend whose model lives in a child process (see the module's docstring).
    The model is loaded when this object is made, so load errors surface where they did
    in process; after a death, the next render or stream starts a fresh child. Variants
    whose model would be one copy (`shared_model_key`) share one child, which ends when
    the last of them closes; `share=False` gives this one a child of its own."""

    def __init__(self, variant: Any, home: Path | None, *, env: dict[str, str] | None = None,
                 share: bool = True) -> None:
        self.variant = variant
        self.name = variant.name
        self.home = Path(home) if home is not None else None
        self.label = f"variant {variant.name!r}"
        self._load = {"target": "pipelines.inference.worker_child:load_chat_backend",
                      "args": {"variant": variant.model_dump(mode="json"),
                               "home": str(self.home) if self.home is not None else None}}
        self._env = env
        self.last: Delta | None = None
        with _SHARED_LOCK:
            self.handle = f"{variant.name}#{next(_HANDLES)}"
            key = shared_model_key(variant, self.home) if share else None
            self._key = None if key is None else (key, str(self.home), _env_key(env))
            process = _SHARED.get(self._key) if self._key is not None else None
            if process is None:
                name = self.name if key is None else base_name(variant)
                process = ModelProcess(None, self.label, worker_log(self.home, name), env)
                if self._key is not None:
                    _SHARED[self._key] = process
            process.loads[self.handle] = self._load  # reserved: not closed under us
            process.labels[self.handle] = self.label
        self.process = process
        self._closed = False
        try:
            process.attach(self.handle, self._load, self.label)
        except BaseException:
            self.close()
            raise

    @property
    def info(self) -> dict[str, Any]:
        return self.process.infos.get(self.handle, {})

    @property
    def shared_with(self) -> list[str]:
        """The other variants served by this one's process."""
        return sorted(h.rpartition("#")[0] for h in self.process.loads if h != self.handle)

    def _ready(self) -> ModelProcess:
        if self._closed:
            raise BackendError(f"{self.label}: this backend was closed")
        self.process.ensure(self.handle)
        return self.process

    def render(self, messages: Sequence[Message]) -> str:
        return self._ready().request("render", "rendering the prompt", label=self.label,
                                     timeout=RENDER_TIMEOUT_S, handle=self.handle,
                                     messages=list(messages))

    def stream(self, messages: Sequence[Message], options: GenerationOptions) -> Iterator[Delta]:
        lines = self._ready().stream("stream", "generating a reply", label=self.label,
                                     handle=self.handle, messages=list(messages),
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
        """This variant's backend freed in the child; the child exits with the last one."""
        with _SHARED_LOCK:
            if self._closed:
                return
            self._closed = True
            last = len(self.process.loads) <= 1
            if last and self._key is not None and _SHARED.get(self._key) is self.process:
                del _SHARED[self._key]  # a variant opened from now on starts its own child
        self.process.detach(self.handle)


# Processes serving variants that share a model, by (shared_model_key, home, environment).
_SHARED: dict[tuple, ModelProcess] = {}
_SHARED_LOCK = threading.Lock()
_HANDLES = itertools.count(1)


def _env_key(env: dict[str, str] | None) -> tuple:
    """What of the environment decides which classes serve a variant (tests' stand-ins)."""
    source = os.environ if env is None else env
    return (source.get(ENV_BACKENDS, ""), None if env is None else tuple(sorted(env.items())))


def shared_processes() -> dict[tuple, list[str]]:
    """The live shared processes: their key and the variants they serve."""
    with _SHARED_LOCK:
        return {key: sorted(h.rpartition("#")[0] for h in p.loads)
                for key, p in _SHARED.items() if p.loads}


def shared_model_key(variant: Any, home: Path | None) -> tuple | None:
    """What decides whether two variants' models are one copy in one process, from the
    variant alone (no torch, no llama_cpp, nothing made or downloaded), so that spawn_backend
    can send them to the same worker: the kind's `shared_key` (`inference.kinds`), which
    mirrors that backend's in-process cache. None for a variant with no local model."""
    from pipelines.inference.kinds import kind_of

    return kind_of(variant).shared_key(variant, home)


def base_name(variant: Any) -> str:
    """The name of the model a shared process holds, for its log: worker-<base>.log."""
    from pipelines.inference.kinds import kind_of

    return kind_of(variant).base_name(variant)


def spawn_backend(variant: Any, home: Path) -> Any:
    """The backend the console and `kyara ask` use: a local model (hf, gguf) in a worker
    process, so a native crash or the OOM killer ends that process, not theirs; variants
    on one base model (`shared_model_key`) share one process and one copy of it. A remote
    one (openai: HTTP only) in this process."""
    from pipelines.inference.kinds import kind_of
    from pipelines.inference.registry import load_backend

    if kind_of(variant).local:
        return WorkerBackend(variant, home)
    return load_backend(variant, home)


# --- the child side: pipelines/inference/worker_child.py ---------------------------------
# `python -m pipelines.inference.worker` (how ModelProcess starts a child) runs its main.

if __name__ == "__main__":
    from pipelines.inference.worker_child import main

    sys.exit(main())
