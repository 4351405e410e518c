"""The job runner: `python -m pipelines run CFG.yaml [--run-dir DIR] [--run-id ID]`.

One run = one process = one run directory:

    DIR/events.jsonl    every event, the console's only view of the run (pipelines/events.py)
    DIR/config.yaml     the whole resolved config (nanoGPT's habit: rerun exactly this)
    DIR/traceback.txt   the full traceback of a failure; the error event has one line
    DIR/exit.json       written last: status, exit code, error kind and message, seconds

and one row of the store's `runs` table (status starting -> running -> done / error /
cancelled; the console may add `lost` for a process that died without a word).

Exit status: 0 done, 1 the job failed, 2 a problem the user can fix (config, store),
128 + the signal number when cancelled (143 for SIGTERM, 130 for Ctrl+C).

Cancellation is SIGTERM (the console sends it to the run's process group). It raises
JobCancelled inside the job, wherever it is, the way Ctrl+C raises KeyboardInterrupt: a job
blocked in a long native call still stops, and its `finally` blocks and context managers
run. The end of the run (the last event, the store row, exit.json) is written with that
signal handler turned off, so a second SIGTERM cannot cut the record short.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

import yaml

from pipelines import events as ev
from pipelines.config import AppSettings, ConfigError, apply_env, load_job, read_yaml
from pipelines.events import EVENTS_FILE, Event, EventWriter
from pipelines.files import write_json
from pipelines.home import Home
from pipelines.jobs import JobCancelled, JobContext, get_job

CONFIG_FILE = "config.yaml"
EXIT_FILE = "exit.json"
TRACEBACK_FILE = "traceback.txt"
PID_FILE = "pid"

EXIT_DONE, EXIT_FAILED, EXIT_USER = 0, 1, 2
FINAL_STATUSES = frozenset({"done", "error", "cancelled", "lost"})
# Error kinds that are the user's to fix: no exception type in the message, exit status 2.
_USER_KINDS = frozenset({ev.CONFIG, ev.STORE, ev.NOT_IMPLEMENTED})
_SIGNALS = {signal.SIGTERM: "SIGTERM", signal.SIGHUP: "SIGHUP"}


def new_run_id() -> str:
    # store.new_id() is the same thing, but importing store costs ~2 s (lancedb); a run id
    # is needed before we know whether the store is wanted at all.
    return str(uuid.uuid4())


def run_dir_name(name: str, run_id: str, when: datetime | None = None) -> str:
    """`<name>-<YYYYmmdd-HHMMSS>-<first 8 of the id>`: sorts by time within a name, and is
    unique without a lookup."""
    safe = re.sub(r"[^\w.-]+", "-", name).strip("-.") or "run"
    stamp = (when or datetime.now()).strftime("%Y%m%d-%H%M%S")
    return f"{safe}-{stamp}-{run_id[:8]}"


def default_run_dir(home: Path, name: str, run_id: str) -> Path:
    return Home(home).runs / run_dir_name(name, run_id)


def resolved_config_yaml(cfg: Any, source: str | Path, run_id: str) -> str:
    header = f"# resolved config of run {run_id}\n# from {source}\n"
    body = yaml.safe_dump(cfg.model_dump(mode="json"), allow_unicode=True, sort_keys=False)
    return header + body


def record_run(store: Any, run_id: str, **changes: Any) -> dict[str, Any]:
    """Get, modify, upsert one `runs` row (upsert replaces the whole row, so a blind write
    would blank the columns it leaves out). `summary` is a dict stored as summary_json."""
    if "summary" in changes:
        summary = changes.pop("summary")
        changes["summary_json"] = None if summary is None else json.dumps(summary,
                                                                          ensure_ascii=False)
    row = store.get("runs", run_id) or {"id": run_id}
    row.update(changes)
    store.upsert("runs", [row])
    return row


@dataclass
class RunOutcome:
    run_id: str
    run_dir: Path | None
    status: str  # done | error | cancelled
    exit_code: int
    final: Event | None = None
    summary: dict[str, Any] = field(default_factory=dict)


# --- signals -------------------------------------------------------------------------------


class _Cancellation:
    """SIGTERM / SIGHUP handling: always remember the signal; raise JobCancelled only while
    the job itself runs."""

    def __init__(self, ctx_holder: list[JobContext], early: list[int] | None = None) -> None:
        self._signal: int | None = None
        self._early = early if early is not None else []  # caught before we were installed
        self.raising = False
        self._ctx_holder = ctx_holder
        self._previous: dict[int, Any] = {}

    @property
    def signal(self) -> int | None:
        return self._signal if self._signal is not None else (
            self._early[0] if self._early else None)

    def handler(self, signum: int, frame: Any) -> None:
        first = self.signal is None
        if first:
            self._signal = signum
        for ctx in self._ctx_holder:
            ctx.cancel()
        if first and self.raising:
            self.raising = False  # once: a second signal must not interrupt the cleanup
            raise JobCancelled()

    @contextmanager
    def installed(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield  # only the main thread may set handlers (a test may run jobs elsewhere)
            return
        for signum in _SIGNALS:
            self._previous[signum] = signal.signal(signum, self.handler)
        try:
            yield
        finally:
            for signum, previous in self._previous.items():
                signal.signal(signum, previous)


def _cancel_message(signum: int | None, interrupted: bool) -> tuple[str, int]:
    if signum is not None:
        return f"cancelled ({_SIGNALS.get(signum, f'signal {signum}')})", 128 + signum
    if interrupted:
        return "cancelled: interrupted (Ctrl+C)", 128 + signal.SIGINT
    return "cancelled", 128 + signal.SIGTERM  # ctx.cancel() from inside the process


# --- the run -------------------------------------------------------------------------------


def _raw_kind_and_name(cfg_path: Path) -> tuple[str, str]:
    """Best-effort kind and name of a config that did not validate, for the record."""
    try:
        data = read_yaml(cfg_path)
    except ConfigError:
        data = None
    data = data if isinstance(data, dict) else {}
    kind = data.get("job") if isinstance(data.get("job"), str) else "unknown"
    name = data.get("name") if isinstance(data.get("name"), str) else cfg_path.stem
    return kind, name


def _error_kind(exc: BaseException) -> str:
    from pipelines.config import ConfigError as _ConfigError

    if isinstance(exc, _ConfigError):
        return ev.CONFIG
    store_error = sys.modules.get("store.errors")
    if store_error is not None and isinstance(exc, store_error.StoreError):
        return ev.STORE
    return ev.EXCEPTION


def _error_message(exc: BaseException, kind: str) -> str:
    # A ConfigError / StoreError is already a sentence for the user; anything else is a bug
    # or an environment problem, where the exception's type is the first clue.
    text = ev.one_line(exc)
    if kind in _USER_KINDS:
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def run(cfg_path: str | Path, run_dir: str | Path | None = None, run_id: str | None = None,
        configs: str | Path | None = None, stderr: TextIO | None = None,
        early_signals: list[int] | None = None) -> RunOutcome:
    """Run the job of `cfg_path` in this process, recording everything. Never raises for a
    failure of the job or of the user's files: the outcome says what happened."""
    stderr = stderr if stderr is not None else sys.stderr
    cfg_path = Path(cfg_path)
    run_id = run_id or new_run_id()
    started = time.time()

    def say(message: str) -> None:
        stderr.write(f"kyara: {ev.one_line(message)}\n")
        stderr.flush()

    # 1. What to run, and where. Problems here are the user's to fix: exit 2.
    problem: str | None = None
    cfg: Any = None
    workspace: Any = None
    try:
        cfg = load_job(cfg_path)
        from pipelines.workspace import Workspace

        workspace = Workspace.load(configs)
    except ConfigError as exc:
        problem = str(exc)
    settings = workspace.settings if workspace is not None else apply_env(AppSettings())
    kind, name = (cfg.job, cfg.name) if cfg is not None else _raw_kind_and_name(cfg_path)
    directory = Path(run_dir) if run_dir else default_run_dir(settings.home_path(), name, run_id)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        events_path = directory / EVENTS_FILE
        if events_path.exists() and events_path.stat().st_size > 0:
            say(f"{directory}: already holds a run (events.jsonl is not empty); give a new "
                "--run-dir")
            return RunOutcome(run_id, None, "error", EXIT_USER)
        writer = EventWriter(events_path, run_id)
    except OSError as exc:
        say(f"{directory}: cannot write the run directory: {exc.strerror or exc}")
        return RunOutcome(run_id, None, "error", EXIT_USER)
    row = {"kind": kind, "name": name, "config_path": str(cfg_path.resolve()),
           "run_dir": str(directory), "pid": os.getpid()}

    holder: list[JobContext] = []
    cancellation = _Cancellation(holder, early_signals)
    with writer, cancellation.installed():
        if problem is not None:
            final = writer.write(ev.error(ev.CONFIG, problem))
            store = _open_store_quietly(settings)  # to list the failed run beside the others
            return _finish(writer, store, row, directory, run_id, final, EXIT_USER, started,
                           say)
        (directory / CONFIG_FILE).write_text(
            resolved_config_yaml(cfg, cfg_path.resolve(), run_id), encoding="utf-8")
        try:
            from store import Store

            store = Store.open(settings.store_path())
            record_run(store, run_id, status="running", **row)
        except Exception as exc:  # StoreError, or lancedb failing to import
            final = writer.write(ev.error(ev.STORE, _error_message(exc, ev.STORE)))
            return _finish(writer, None, row, directory, run_id, final, EXIT_USER, started,
                           say)

        # 2. One run of a job at a time on its output: a second is refused, naming the first.
        lock = ExitStack()
        try:
            lock.enter_context(hold_output(cfg, settings.home_path(), run_id))
        except OutputBusy as busy:
            final = writer.write(ev.error(ev.CONFIG, str(busy)))
            return _finish(writer, store, row, directory, run_id, final, EXIT_USER, started,
                           say)

        # 3. Run the job.
        ctx = JobContext(run_id=run_id, run_dir=directory, workspace=workspace,
                         home=settings.home_path(), store_path=settings.store_path(),
                         _store=store)
        holder.append(ctx)
        if cancellation.signal is not None:
            ctx.cancel()
        with lock:
            final, code = _drive(cfg, ctx, writer, cancellation, directory)
        return _finish(writer, store, row, directory, run_id, final, code, started, say)


class OutputBusy(Exception):
    """Another run of this job holds its output (one line: which run)."""


def output_of(cfg: Any, home: Path) -> Path | None:
    """The folder the job writes what it makes (its kind's `output_dir` / `search_dir`),
    or None for a kind without one."""
    module = get_job(cfg.job)
    find = getattr(module, "output_dir", None) or getattr(module, "search_dir", None)
    return find(cfg, home) if callable(find) else None


@contextmanager
def hold_output(cfg: Any, home: Path, run_id: str) -> Iterator[Path]:
    """An exclusive lock (flock) on the job's output, held for the whole run: two runs of
    one job never write the same files (eval's replies.jsonl, evolve's evaluations.jsonl).
    The lock file sits beside the output (`.<name>.kyara-lock`; a kind without an output:
    <home>/runs/.locks/<kind>-<name>.lock) and names its holder; the kernel releases it
    when the run's process ends, however it ends."""
    import fcntl

    out = output_of(cfg, home)
    path = (out.parent / f".{out.name}.kyara-lock" if out is not None
            else Home(home).runs / ".locks" / f"{cfg.job}-{cfg.name}.lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
            try:
                who = json.loads(holder)
                said = f"run {who['run_id']} (pid {who['pid']}, started {who['started']})"
            except (ValueError, KeyError, TypeError):
                said = "another run"
            what = out if out is not None else f"the {cfg.job} job {cfg.name!r}"
            raise OutputBusy(f"{what} is in use by {said}: wait for it to end, or cancel "
                             "it (kyara jobs cancel)") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"run_id": run_id, "pid": os.getpid(),
                                  "started": datetime.now(timezone.utc).isoformat(
                                      timespec="seconds")}).encode(), 0)
        yield path
    finally:
        os.close(fd)  # the lock goes with it


def _drive(cfg: Any, ctx: JobContext, writer: EventWriter, cancellation: _Cancellation,
           directory: Path) -> tuple[Event, int]:
    """Iterate the job, writing its events; turn every way it can end into one final event,
    written exactly once."""
    final: Event | None = None
    code: int | None = None
    job_events: Iterator[Event] | None = None
    try:
        cancellation.raising = True
        if cancellation.signal is not None:  # the signal came before the job started
            raise JobCancelled()
        job_events = iter(get_job(cfg.job).run(cfg, ctx))
        for event in job_events:
            if not isinstance(event, Event):
                raise TypeError(f"a job must yield Event objects, not {type(event).__name__}")
            if event.terminal:
                # Off before the write: a SIGTERM now either stops the run before its end is
                # written (cancelled) or after (it ended as it said), never both.
                cancellation.raising = False
                final = writer.write(event)
                break
            writer.write(event)
        cancellation.raising = False
    except (JobCancelled, KeyboardInterrupt) as exc:
        cancellation.raising = False
        message, code = _cancel_message(cancellation.signal,
                                        isinstance(exc, KeyboardInterrupt))
        final = writer.write(ev.error(ev.CANCELLED, message))
    except (Exception, SystemExit) as exc:
        cancellation.raising = False
        kind = _error_kind(exc)
        (directory / TRACEBACK_FILE).write_text("".join(traceback.format_exception(exc)),
                                                encoding="utf-8")
        message = (f"the job called sys.exit({exc.code!r})" if isinstance(exc, SystemExit)
                   else _error_message(exc, kind))
        final = writer.write(ev.error(kind, message))
    finally:
        cancellation.raising = False
        if job_events is not None and hasattr(job_events, "close"):
            try:
                job_events.close()  # a job that yielded its own done/error: run its finally
            except Exception:  # the outcome is already decided; its cleanup failing changes nothing
                pass
    if final is None:
        final = writer.write(ev.done({}))  # the generator ended without a word: it ended well
    if code is None:
        code = _exit_code(final)
    return final, code


def _exit_code(final: Event) -> int:
    if final.type == "done":
        return EXIT_DONE
    if final.kind == ev.CANCELLED:
        return 128 + signal.SIGTERM
    return EXIT_USER if final.kind in _USER_KINDS else EXIT_FAILED


def _finish(writer: EventWriter, store: Any, row: dict[str, Any], directory: Path,
            run_id: str, final: Event, code: int, started: float, say: Any) -> RunOutcome:
    status = final.final_status
    summary = (final.summary or {}) if final.type == "done" else {
        "error": {"kind": final.kind, "message": final.message}}
    if store is not None:
        _record_quietly(store, say, run_id, status=status, summary=summary, **row)
    write_json(directory / EXIT_FILE, {
        "run_id": run_id,
        "status": status,
        "exit_code": code,
        "error_kind": final.kind if final.type == "error" else None,
        "message": final.message if final.type == "error" else None,
        "pid": os.getpid(),
        "ended_at": datetime.now(timezone.utc).isoformat(),
        "seconds": round(time.time() - started, 3),
    })
    if final.type == "error":
        hint = (f" (traceback in {directory / TRACEBACK_FILE})"
                if (directory / TRACEBACK_FILE).exists() else "")
        say(f"{final.message}{hint}")
    return RunOutcome(run_id, directory, status, code, final, summary)


def _open_store_quietly(settings: AppSettings) -> Any:
    try:
        from store import Store

        return Store.open(settings.store_path())
    except Exception:
        return None  # the config error is the message; a store problem can wait


def _record_quietly(store: Any, say: Any, run_id: str, **changes: Any) -> None:
    """The events file already tells the truth; a store that fails now costs the list its
    row, not the run its outcome."""
    try:
        record_run(store, run_id, **changes)
    except Exception as exc:
        say(f"could not record run {run_id} in the store: {ev.one_line(exc)}")


def main_run(cfg_path: str, run_dir: str | None, run_id: str | None, configs: str | None,
             early_signals: list[int] | None = None) -> int:
    return run(cfg_path, run_dir=run_dir, run_id=run_id, configs=configs,
               early_signals=early_signals).exit_code
