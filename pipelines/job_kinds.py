"""Job kinds: which module runs which kind, and whether a kind can run in this process.

A leaf (it imports only the config): the workspace asks it which job files to offer, and
pipelines.jobs (which imports the workspace's users) re-exports it.

`KYARA_JOB_MODULES="kind=package.module,..."` maps kinds to other modules: how tests run
tiny stand-in jobs through the real runner in a subprocess, and how a job being written
out of tree can be tried before it joins JOBS.
"""

from __future__ import annotations

import os
from typing import Any

from pipelines.config import ConfigError

# kind -> module with run(cfg, ctx). Kinds of pipelines.config.JOB_KINDS not listed here
# are known to the config but not implemented yet.
JOBS: dict[str, str] = {
    "index": "pipelines.jobs.index",
    "merge": "pipelines.jobs.merge",
    "train": "pipelines.jobs.train",
    "curate": "pipelines.jobs.curate",
    "export": "pipelines.jobs.export",
    "evolve": "pipelines.jobs.evolve",
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
