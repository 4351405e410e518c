"""Jobs: one module per job kind, each with `run(cfg, ctx) -> Iterator[Event]`.

    from pipelines.jobs import JobContext, get_job
    events = list(get_job("index").run(cfg, JobContext.create(workspace, run_dir)))

Modules are imported when their kind is asked for, not before: a training job pulls in
torch, and nothing else (the console, `kyara jobs list`) should pay for that.

`KYARA_JOB_MODULES="kind=package.module,..."` maps kinds to other modules. It is how tests
run tiny stand-in jobs through the real runner in a subprocess, and how a job being written
out of tree can be tried before it joins JOBS.

A kind the config knows but nothing implements is never offered: `Workspace.jobs()` (the
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

# Which kinds are implemented lives in pipelines/job_kinds.py: the workspace asks it too
# (what the console offers), and must not import this package.
from pipelines.job_kinds import (  # noqa: F401 - part of this package's interface
    ENV_MODULES,
    JOBS,
    _registered,
    is_implemented,
    module_for,
    not_implemented,
    require_implemented,
)


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
    """Where a job writes what it makes: its `output:` (~ and $VARS expanded), else
    <home>/<folder>/<job name>. Absolute."""
    if output:
        return Path(os.path.expandvars(output)).expanduser().resolve()
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
    "output_dir",
    "is_implemented",
    "not_implemented",
    "register",
    "require_implemented",
    "unregister",
]
