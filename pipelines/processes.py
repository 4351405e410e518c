"""How kyara starts Python processes of its own (the job runner, model workers, training
ranks, the embedder build): never with the current directory on `sys.path`.

`python -m X` and `python -c` put the current directory first on `sys.path`, so a `json.py`
left in a shared folder would run as the user who starts kyara there. Every child is started
with `-P` (Python 3.11's safe path) and `PYTHONSAFEPATH=1` in its environment, which the
processes it starts in turn (accelerate's ranks, torchrun) inherit; `PYTHONPATH` keeps only
absolute entries (an empty or relative one means the current directory) after this
checkout's root, so the children import this kyara and nothing planted beside them.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # this checkout (or the installed packages' folder)


PRIVATE_UMASK = 0o077


def private() -> None:
    """What this process creates (files and folders under the home, logs, exports) is its
    user's alone, whatever the shell's umask: umask 077, inherited by every child. Called
    first by each entry point: `kyara`, the job runner, the model worker."""
    os.umask(PRIVATE_UMASK)


def python(*args: str) -> list[str]:
    """The command line of a Python child: this interpreter, safe path, then `args`
    (`"-m", "module", ...` or `"-c", code, ...`)."""
    return [sys.executable, "-P", *args]


def child_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """`base` (the environment by default) for a Python child: PYTHONSAFEPATH=1, and
    PYTHONPATH this checkout's root first, then the absolute entries already there."""
    env = dict(os.environ if base is None else base)
    env["PYTHONSAFEPATH"] = "1"
    kept = [p for p in env.get("PYTHONPATH", "").split(os.pathsep)
            if p and os.path.isabs(p) and p != str(ROOT)]
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *kept])
    return env
