"""Jobs: one module per job kind, each with `run(cfg, ctx) -> Iterator[Event]`.

    from pipelines.jobs import JobContext, get_job
    events = list(get_job("index").run(cfg, JobContext.create(workspace, run_dir)))

Modules are imported when their kind is asked for, not before: a training job pulls in
torch, and nothing else (the console, `kyara jobs list`) should pay for that.

`KYARA_JOB_MODULES="kind=package.module,..."` maps kinds to other modules. It is how tests
run tiny stand-in jobs through the real runner in a subprocess, and how a job being written
out of tree can be tried before it joins JOBS.

A kind the config knows but nothing implements is never offered: `offered_jobs()` (the
console's palette and jobs screen, `kyara jobs list`) leaves its files out with the reason
`not_implemented` gives, and launching one (`kyara jobs run`) is refused before a run
starts. The runner still answers one `not implemented` error event if asked directly.
"""

from __future__ import annotations

import importlib
import os
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

from pipelines import events as ev
from pipelines.config import JOB_KINDS, ConfigError
from pipelines.events import Event

# kind -> module with run(cfg, ctx). Kinds of pipelines.config.JOB_KINDS not listed here
# are known to the config but not implemented yet.
JOBS: dict[str, str] = {
    "index": "pipelines.jobs.index",
    "merge": "pipelines.jobs.merge",
    "train": "pipelines.jobs.train",
    "prefer": "pipelines.jobs.prefer",
    "curate": "pipelines.jobs.curate",
    "export": "pipelines.jobs.export",
    "evolve": "pipelines.jobs.evolve",
    "eval": "pipelines.jobs.eval",
}
ENV_MODULES = "KYARA_JOB_MODULES"

# jobs registered as objects in this process (pipelines.jobs.register): tests
_registered: dict[str, Any] = {}


def _env_modules() -> dict[str, str]:
    mapping: dict[str, str] = {}
    for item in os.environ.get(ENV_MODULES, "").split(","):
        if not item.strip():
            continue
        kind, sep, module = item.partition("=")
        if not sep or not kind.strip() or not module.strip():
            raise ConfigError(f"{ENV_MODULES}: expected kind=module[,kind=module], "
                              f"found {item.strip()!r}")
        mapping[kind.strip()] = module.strip()
    return mapping


def module_for(kind: str) -> str | None:
    return _env_modules().get(kind) or JOBS.get(kind)


def is_implemented(kind: str) -> bool:
    return kind in _registered or module_for(kind) is not None


def not_implemented(kind: str) -> str | None:
    """Why a job of `kind` cannot run in this process (one line), or None when it can."""
    return None if is_implemented(kind) else f"job kind '{kind}' is not implemented yet"


def require_implemented(kind: str, path: str | os.PathLike[str] | None = None) -> None:
    """Refuse (ConfigError, one line) a job whose kind is not implemented: before a launch,
    so no run is started only to fail."""
    why = not_implemented(kind)
    if why:
        raise ConfigError(f"{path}: {why}" if path else why)


def offered_jobs(workspace: Any) -> tuple[dict[str, Path], list[str]]:
    """The job files the console offers and `kyara jobs list` shows (name -> path): those
    that load and whose kind runs. The others come back as one line each: a file that does
    not load (Workspace.jobs), or a kind that is not implemented yet."""
    loaded, problems = workspace.loaded_jobs()
    offered: dict[str, Path] = {}
    for name, (path, cfg) in loaded.items():
        why = not_implemented(cfg.job)
        if why:
            problems.append(f"{path}: {why}")
        else:
            offered[name] = path
    return offered, problems


class Job(Protocol):
    def run(self, cfg: Any, ctx: JobContext) -> Iterator[Event]: ...


class JobCancelled(BaseException):
    """Raised inside a job when its run is cancelled (SIGTERM, Ctrl+C). A BaseException,
    like KeyboardInterrupt, so a job's `except Exception` does not swallow it."""


@dataclass
class JobContext:
    """What a job gets besides its config."""

    run_id: str
    run_dir: Path
    workspace: Any  # pipelines.workspace.Workspace
    home: Path
    store_path: Path | None = None
    _store: Any = None
    _cancel: threading.Event = field(default_factory=threading.Event)

    @classmethod
    def create(cls, workspace: Any, run_dir: str | os.PathLike[str], run_id: str | None = None,
               store: Any = None) -> JobContext:
        return cls(run_id=run_id or str(uuid.uuid4()), run_dir=Path(run_dir), workspace=workspace,
                   home=workspace.settings.home_path(),
                   store_path=workspace.settings.store_path(), _store=store)

    @property
    def store(self) -> Any:
        """The store (opened on first use: not every job needs it)."""
        if self._store is None:
            from store import Store

            self._store = Store.open(self.store_path or self.workspace.settings.store_path())
        return self._store

    def cancel(self) -> None:
        self._cancel.set()

    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def check_cancelled(self) -> None:
        """Call between steps: raises JobCancelled once the run is cancelled."""
        if self._cancel.is_set():
            raise JobCancelled()


def output_dir(output: str | None, home: Path, folder: str, name: str) -> Path:
    """Where a job writes what it makes: its `output:` (~ and $VARS expanded; a relative
    one under the home, never the directory the job was started from), else
    <home>/<folder>/<job name>. Absolute."""
    if output:
        path = Path(os.path.expandvars(output)).expanduser()
        return (path if path.is_absolute() else Path(home) / path).resolve()
    return (Path(home) / folder / name).resolve()


class NotImplementedJob:
    """Stands in for a kind the config knows but no module implements yet."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def run(self, cfg: Any, ctx: JobContext) -> Iterator[Event]:
        yield ev.error(ev.NOT_IMPLEMENTED, not_implemented(self.kind) or "")


def register(kind: str, job: Any) -> None:
    """Use `job` (anything with run(cfg, ctx)) for `kind` in this process."""
    _registered[kind] = job


def unregister(kind: str) -> None:
    _registered.pop(kind, None)


def get_job(kind: str) -> Job:
    """The job for `kind`: a registered object, else its module (imported now), else a
    stand-in whose run() yields one `not implemented` error event."""
    if kind in _registered:
        return _registered[kind]
    module = module_for(kind)
    if module is None:
        if kind not in JOB_KINDS:
            raise ConfigError(f"unknown job kind '{kind}' (expected one of: "
                              f"{', '.join(JOB_KINDS)})")
        return NotImplementedJob(kind)
    loaded: ModuleType = importlib.import_module(module)
    if not callable(getattr(loaded, "run", None)):
        raise ConfigError(f"job module {module} has no run(cfg, ctx) function")
    return loaded  # type: ignore[return-value]


__all__ = [
    "JOBS",
    "Job",
    "JobCancelled",
    "JobContext",
    "NotImplementedJob",
    "get_job",
    "offered_jobs",
    "output_dir",
    "is_implemented",
    "not_implemented",
    "register",
    "require_implemented",
    "unregister",
]
