"""The console's side of jobs, without any screen: launch, list, tail, status, cancel.

The jobs screen and `kyara jobs` both call these. Never imports textual or torch, and keeps
the store (lancedb, ~2 s to import) out of module import: `kyara jobs --help` stays quick.

A job runs as `python -m pipelines run CFG --run-dir DIR --run-id ID` in its own session
(setsid): no controlling terminal, its own process group. So a dropped SSH connection or a
closed console kills the screen, not the job; cancel() signals the job's process group, so
whatever the job started (a converter subprocess, data-loader workers) stops with it; and
the GPU memory a job holds goes back when its process ends.

Re-attaching after a restart needs nothing but the store and the run directories:
list_runs(store) for what exists, tail(run_dir, 0) for each one's whole story.

Statuses: starting (launched, the runner has not reported yet), running, done, error,
cancelled, and lost: the process is gone without a done or error event (SIGKILL, the OOM
killer, a power cut). `lost` is worked out here; the runner can never write it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from console.text import visible as _visible
from pipelines import events as ev
from pipelines.config import ConfigError, load_job
from pipelines.events import EVENTS_FILE, Event, Tailer, last_event, read_events
from pipelines.jobs import require_implemented
from pipelines.jobs.runner import (
    EXIT_FILE,
    FINAL_STATUSES,
    PID_FILE,
    default_run_dir,
    new_run_id,
    record_run,
)
from pipelines.processes import child_env as child_env_of
from pipelines.processes import python

STDOUT_FILE = "stdout.log"
STDERR_FILE = "stderr.log"
LOST = "lost"
# A run the store calls `starting` with no pid yet is given this long before it counts as
# lost: launch() writes the row, then starts the process, then writes the pid file.
START_GRACE_S = 15.0
_CANCEL_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class LaunchError(Exception):
    """The job process could not be started. str() is one line."""


@dataclass
class RunHandle:
    """One run, as the store records it plus where to look for the rest."""

    id: str
    name: str
    kind: str
    run_dir: Path | None
    pid: int | None = None
    config_path: str | None = None
    status: str = "starting"  # the live status where list_runs()/refresh() worked it out
    stored_status: str = "starting"  # what the runs table says
    created_at: datetime | None = None
    updated_at: datetime | None = None
    summary: dict[str, Any] | None = field(default=None, repr=False)

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> RunHandle:
        try:
            summary = json.loads(row["summary_json"]) if row.get("summary_json") else None
        except ValueError:
            summary = None
        return cls(id=row["id"], name=row["name"], kind=row["kind"],
                   run_dir=Path(row["run_dir"]) if row.get("run_dir") else None,
                   pid=row.get("pid"), config_path=row.get("config_path"),
                   status=row["status"], stored_status=row["status"],
                   created_at=row.get("created_at"), updated_at=row.get("updated_at"),
                   summary=summary)

    @property
    def events_path(self) -> Path | None:
        return self.run_dir / EVENTS_FILE if self.run_dir else None

    @property
    def finished(self) -> bool:
        return self.status in FINAL_STATUSES


# --- launching -----------------------------------------------------------------------------


def runner_command(cfg_path: Path, run_dir: Path, run_id: str, configs: Path) -> list[str]:
    return python("-m", "pipelines", "run", str(cfg_path), "--run-dir", str(run_dir),
                  "--run-id", run_id, "--configs", str(configs))


def launch(cfg_path: str | os.PathLike[str], workspace: Any, *, store: Any = None,
           run_dir: str | os.PathLike[str] | None = None,
           env: dict[str, str] | None = None, force: bool = False) -> RunHandle:
    """Start the job of `cfg_path` as a detached process and return at once.

    The config is checked first (ConfigError, one line, nothing started). The run's row is
    written (status starting) before the process starts, so a list shows it at once; from
    then on the runner owns the row. Raises LaunchError when the process cannot start.
    `force` sets the job's `force: true` (replace an existing output) in a copy of the job
    file written into the run directory, which is then the file that runs.
    """
    cfg_path = Path(cfg_path).resolve()
    cfg = load_job(cfg_path)
    require_implemented(cfg.job, cfg_path)  # never start a run that can only fail
    if force and "force" not in type(cfg).model_fields:
        article = "an" if cfg.job[0] in "aeiou" else "a"
        raise ConfigError(f"{cfg_path}: {article} {cfg.job} job has no force option")
    run_id = new_run_id()
    directory = (Path(run_dir) if run_dir
                 else default_run_dir(workspace.settings.home_path(), cfg.name, run_id))
    directory = directory.resolve()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LaunchError(f"{directory}: cannot make the run directory: "
                          f"{exc.strerror or exc}") from None
    if force and "force" not in type(cfg).model_fields:
        raise LaunchError(f"--force: a {cfg.job} job has no force option")
    if force and not cfg.force:
        import yaml

        data = yaml.safe_load(cfg_path.read_text(encoding="utf-8"))
        data["force"] = True
        cfg_path = directory / "job.yaml"
        cfg_path.write_text(f"# {cfg.name} with force: true (kyara jobs run --force)\n"
                            + yaml.safe_dump(data, allow_unicode=True, sort_keys=False),
                            encoding="utf-8")
        cfg = load_job(cfg_path)
    if store is None:
        from store import Store

        store = Store.open(workspace.settings.store_path())
    row = {"kind": cfg.job, "name": cfg.name, "config_path": str(cfg_path),
           "run_dir": str(directory)}
    record_run(store, run_id, status="starting", pid=None, **row)

    # The runner imports this kyara even when it is not installed and the console was
    # started from another directory, and nothing from the directory it starts in
    # (pipelines.processes); unbuffered, so its logs reach stdout.log as they come.
    child_env = child_env_of(env)
    child_env["PYTHONUNBUFFERED"] = "1"
    command = runner_command(cfg_path, directory, run_id, Path(workspace.configs).resolve())
    # The child starts with SIGTERM and SIGHUP blocked (a signal mask survives exec) and
    # unblocks them once its handler is in: a cancel sent while it is still importing is
    # then held, not fatal, and the run ends `cancelled` instead of `lost`.
    held = signal.pthread_sigmask(signal.SIG_BLOCK, _CANCEL_SIGNALS)
    try:
        with open(directory / STDOUT_FILE, "ab") as out, open(directory / STDERR_FILE, "ab") as err:
            process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                start_new_session=True,  # own session and process group: survives the SSH
                close_fds=True,          # session; cancel() signals the whole group
                cwd=os.getcwd(), env=child_env)
    except OSError as exc:
        message = f"could not start the job process: {ev.one_line(exc)}"
        record_run(store, run_id, status="error", summary={"error": {"kind": "launch",
                                                                     "message": message}})
        raise LaunchError(message) from None
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)
    (directory / PID_FILE).write_text(f"{process.pid}\n", encoding="ascii")
    # Reap the child when it ends, or it lingers as a zombie while the console lives (and a
    # zombie still answers kill(pid, 0)). If the console dies first, init adopts and reaps.
    threading.Thread(target=process.wait, name=f"kyara-reap-{process.pid}",
                     daemon=True).start()
    handle = RunHandle(id=run_id, name=cfg.name, kind=cfg.job, run_dir=directory,
                       pid=process.pid, config_path=str(cfg_path), status="starting",
                       stored_status="starting", created_at=datetime.now(timezone.utc))
    return handle


# --- looking -------------------------------------------------------------------------------


def list_runs(store: Any, limit: int | None = None) -> list[RunHandle]:
    """Every run in the store, newest first, each with its live status."""
    runs = [RunHandle.from_row(row) for row in store.rows("runs")]
    epoch = datetime.min.replace(tzinfo=timezone.utc)
    runs.sort(key=lambda r: r.created_at or epoch, reverse=True)
    if limit is not None:
        runs = runs[:limit]
    for run in runs:
        run.status = status(run)
    return runs


def get_run(store: Any, ref: str) -> RunHandle:
    """A run by id, unique id prefix, run directory name, or name (the newest of that name).
    Raises LookupError with a one-line message."""
    from store import quote

    row = store.get("runs", ref)
    if row is None:
        rows = store.rows("runs")
        matches = [r for r in rows if r["id"].startswith(ref)]
        if not matches:
            matches = [r for r in rows if r.get("run_dir") and Path(r["run_dir"]).name == ref]
        if not matches:
            matches = store.rows("runs", where=f"name = {quote(ref)}")
            matches.sort(key=lambda r: r["created_at"], reverse=True)
            matches = matches[:1]
        if len(matches) > 1:
            raise LookupError(f"run '{ref}' is ambiguous: {len(matches)} runs match "
                              "(give more of the id)")
        if not matches:
            raise LookupError(f"no run '{ref}' in the store (kyara jobs list shows them)")
        row = matches[0]
    run = RunHandle.from_row(row)
    run.status = status(run)
    return run


def tail(run_dir: str | os.PathLike[str], offset: int = 0) -> tuple[list[Event], int]:
    """The run's events after byte `offset` and the offset for next time (offset 0: all)."""
    return read_events(Path(run_dir) / EVENTS_FILE, offset)


def _pid_of(run: RunHandle) -> int | None:
    if run.pid:
        return int(run.pid)
    if run.run_dir is not None:
        try:
            return int((run.run_dir / PID_FILE).read_text(encoding="ascii").strip())
        except (OSError, ValueError):
            return None
    return None


def process_alive(pid: int, run_id: str | None = None, config_path: str | None = None
                  ) -> bool:
    """Whether `pid` is still this run's job process: its command line names the run id
    (the console starts every run with --run-id), or, for a run started by hand, is the
    runner (`-m pipelines run`) on a config of the same file name. A pid the kernel gave
    to another program since is not this run, so cancel never signals it.

    kill(pid, 0) alone is not enough: an exited child its parent has not reaped (a zombie)
    still answers, and after a long time a pid may belong to another program. On Linux
    /proc settles both; elsewhere kill(pid, 0) is what there is.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False  # another user's process: not a job we started
    proc = Path(f"/proc/{pid}")
    if not proc.is_dir():
        return True
    try:
        stat = (proc / "stat").read_text()
        state = stat.rsplit(")", 1)[1].split()[0]
        if state in ("Z", "X"):
            return False
        cmdline = (proc / "cmdline").read_bytes()
    except (OSError, IndexError):
        return False  # it went away while we looked
    if not cmdline:
        return True  # mid-exec: the new program's arguments are not mapped yet (seen here)
    if run_id and run_id.encode() in cmdline:
        return True
    args = cmdline.split(b"\0")
    runner = any(args[i:i + 2] == [b"pipelines", b"run"] for i in range(len(args)))
    if not runner or (run_id and b"--run-id" in args):  # another program, or another run
        return False
    # A run started by hand (`python -m pipelines run CFG`) has no --run-id on its line.
    return config_path is None or any(Path(a.decode("utf-8", "replace")).name ==
                                      Path(config_path).name for a in args)


def read_exit(run_dir: Path | None) -> dict[str, Any] | None:
    if run_dir is None:
        return None
    try:
        data = json.loads((run_dir / EXIT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def status(run: RunHandle) -> str:
    """The run's status now: the stored status once it is final (no file is read: a list of
    hundreds of old runs stays cheap); exit.json if the runner got that far; else whether
    the process lives (and its last event); else lost."""
    if run.stored_status in FINAL_STATUSES:
        return run.stored_status
    exit_info = read_exit(run.run_dir)
    if exit_info and exit_info.get("status") in FINAL_STATUSES:
        return str(exit_info["status"])
    pid = _pid_of(run)
    if pid is not None and process_alive(pid, run.id, run.config_path):
        # Its done/error event is written before the store row and exit.json: from that
        # line on the run has ended, even while the process finishes its bookkeeping.
        last = last_event(run.events_path) if run.events_path is not None else None
        if last is not None and last.terminal:
            return last.final_status
        return "running" if last is not None else "starting"
    if run.events_path is not None:
        events, _ = read_events(run.events_path)
        terminal = [e for e in events if e.terminal]
        if terminal:  # the runner died between its last event and exit.json
            return terminal[-1].final_status
    if pid is None and run.created_at is not None:
        age = (datetime.now(timezone.utc) - run.created_at).total_seconds()
        if age < START_GRACE_S:
            return "starting"  # launch() is between writing the row and the pid file
    return LOST


def refresh(run: RunHandle) -> RunHandle:
    run.status = status(run)
    return run


def lost_reason(run: RunHandle) -> str:
    """One line for a lost run: what we know, and the last line it wrote to stderr."""
    reason = ("the job process ended without recording how it ended (killed, e.g. SIGKILL "
              "or out of memory?)")
    if run.run_dir is not None:
        try:
            lines = (run.run_dir / STDERR_FILE).read_text(encoding="utf-8",
                                                          errors="replace").splitlines()
        except OSError:
            lines = []
        last = next((line for line in reversed(lines) if line.strip()), None)
        if last:
            reason += f"; last stderr line: {ev.one_line(last, 300)}"
    return reason


def reconcile(store: Any) -> list[RunHandle]:
    """Write the live status of runs that ended unseen (lost, or a runner that died after
    its last event) back to the store; run when the console starts. Returns those runs."""
    changed: list[RunHandle] = []
    for run in list_runs(store):
        if run.status == run.stored_status or run.status not in FINAL_STATUSES:
            continue
        summary = run.summary
        if run.status == LOST:
            summary = {"error": {"kind": LOST, "message": lost_reason(run)}}
        elif run.events_path is not None:
            ends = [e for e in read_events(run.events_path)[0] if e.terminal]
            if ends:
                summary = (ends[-1].summary if ends[-1].type == "done" else
                           {"error": {"kind": ends[-1].kind, "message": ends[-1].message}})
        record_run(store, run.id, status=run.status, summary=summary)
        run.stored_status = run.status
        changed.append(run)
    return changed


# --- following and stopping ----------------------------------------------------------------


def follow(run: RunHandle, interval: float = 0.25, offset: int = 0) -> Iterator[Event]:
    """Yield the run's events as they are written, until its done/error event. A run that
    dies without one ends with a synthetic `error` event of kind `lost`."""
    if run.run_dir is None:
        raise ValueError(f"run {run.id} has no run directory")
    tailer = Tailer(run.run_dir / EVENTS_FILE, offset)
    while True:
        yield from tailer.poll()
        if tailer.finished:
            return
        if status(run) in FINAL_STATUSES:
            yield from tailer.poll()  # what it wrote between our last read and its end
            if not tailer.finished:
                yield ev.error(LOST, lost_reason(run))
            return
        time.sleep(interval)


def cancel(run: RunHandle, force: bool = False) -> bool:
    """SIGTERM (SIGKILL with force) to the run's process group. False if it is not running.

    The runner turns SIGTERM into a `cancelled` error event and exits; SIGKILL leaves no
    record (the run then reads as lost), so keep it for a job that ignores SIGTERM.
    """
    pid = _pid_of(run)
    if pid is None or status(run) in FINAL_STATUSES or not process_alive(pid, run.id,
                                                                         run.config_path):
        return False
    sig = signal.SIGKILL if force else signal.SIGTERM
    try:
        if os.getpgid(pid) == pid:  # launched by us: leader of its own group
            os.killpg(pid, sig)
        else:  # started by hand inside a shell's process group: only the runner itself
            os.kill(pid, sig)
    except ProcessLookupError:
        return False
    return True


def describe(event: Event) -> str:
    """One plain-text line for an event (for logs and the CLI; not markup)."""
    clock = datetime.fromtimestamp(event.ts).strftime("%H:%M:%S")
    if event.type == "start":
        text = f"start {event.job} {event.name}" + (f": {event.message}" if event.message else "")
    elif event.type == "stage":
        text = f"stage {event.stage}" + (f": {event.message}" if event.message else "")
    elif event.type == "progress":
        total = f"/{event.total:g}" if event.total is not None else ""
        unit = f" {event.unit}" if event.unit else ""
        text = f"progress {event.current:g}{total}{unit}"
    elif event.type == "metric":
        step = f" (step {event.step})" if event.step is not None else ""
        text = f"metric {event.name} = {event.value:g}{step}"
    elif event.type == "log":
        text = f"{event.level} {event.message}"
    elif event.type == "done":
        text = "done " + json.dumps(event.summary or {}, ensure_ascii=False)
    else:
        text = f"error [{event.kind}] {event.message}"
    return f"{clock} {visible(ev.one_line(text, 1000))}"


def visible(text: str) -> str:
    """Control characters as \\xNN, newlines too (one line): an escape sequence from a job
    shows, and does nothing (console.text)."""
    return _visible(text, lines=False)
