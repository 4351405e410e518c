"""The kyara home (`home:` in kyara.yaml, `KYARA_HOME`): every sub-folder named once, and
the file names of an eval run's folder. Standard library only, so the console can use it
without paying for pipelines' imports.

    Home(root).runs / "my-run"          # what `root / "runs" / "my-run"` used to spell
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

STORE = "store"      # the LanceDB store (unless `store:` / KYARA_STORE says otherwise)
MODELS = "models"    # registered variants' YAML, embedded GGUFs, dequantised folders, embedders
RUNS = "runs"        # job runs (events.jsonl) and the train / prefer / curate jobs' outputs
LOGS = "logs"        # model workers' logs: worker-<base>.log
TOOLS = "tools"      # llama.cpp's converters, per version
EXPORTS = "exports"  # the export job's outputs
MERGES = "merges"    # the merge job's outputs
EVOLVE = "evolve"    # the evolve job's outputs
EVALS = "evals"      # the eval job's runs, one folder each (EvalFiles)
JOBS = "jobs"        # job configs written by kyara itself (the ship script's export job)
ASKS = "asks"        # generated questions per persona (retrieval.asks)
JUDGES = "judges"    # per judge: calibration.json


class EvalFiles:
    """The files of one eval run's folder (`<home>/evals/<name>/`)."""

    PLAN = "plan.json"            # counts and cost, before work
    REPLIES = "replies.jsonl"     # one record per reply, appended as made
    VERDICTS = "verdicts.jsonl"   # one record per verdict
    RESULTS = "results.json"      # build_results' output; all the console reads
    REPORT_MD = "report.md"
    REPORT_HTML = "report.html"
    BATCH = "batch.json"          # the Batch API's state, with `batch: true`


class Home:
    """A kyara home folder; each property is one of its sub-folders (nothing is made)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"Home({str(self.root)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Home) and other.root == self.root

    def __hash__(self) -> int:
        return hash(self.root)

    @property
    def store(self) -> Path:
        return self.root / STORE

    @property
    def models(self) -> Path:
        return self.root / MODELS

    @property
    def runs(self) -> Path:
        return self.root / RUNS

    @property
    def logs(self) -> Path:
        return self.root / LOGS

    @property
    def tools(self) -> Path:
        return self.root / TOOLS

    @property
    def exports(self) -> Path:
        return self.root / EXPORTS

    @property
    def merges(self) -> Path:
        return self.root / MERGES

    @property
    def evolve(self) -> Path:
        return self.root / EVOLVE

    @property
    def evals(self) -> Path:
        return self.root / EVALS

    @property
    def jobs(self) -> Path:
        return self.root / JOBS

    @property
    def asks(self) -> Path:
        return self.root / ASKS

    @property
    def judges(self) -> Path:
        return self.root / JUDGES


def home_problem(root: str | os.PathLike[str]) -> str | None:
    """One line when other users can enter the home, else None. The home's own mode is
    what counts: a 0700 folder keeps everything inside it private, whatever their modes."""
    root = Path(root)
    if not root.is_dir():
        return None
    mode = stat.S_IMODE(root.stat().st_mode)
    if not mode & 0o077:
        return None
    return (f"the kyara home {root} is open to other users (mode {mode:04o}): "
            "kyara doctor --fix-permissions makes it and everything in it yours alone")


def ensure_private_home(root: str | os.PathLike[str]) -> str | None:
    """The home, created 0700 when missing (its parents as the umask says); for an existing
    one, `home_problem`'s line (None: private). Nothing is changed without consent:
    `make_private` does, for `kyara doctor --fix-permissions`."""
    root = Path(root)
    if not root.exists():
        root.parent.mkdir(parents=True, exist_ok=True)
        try:
            root.mkdir(mode=0o700)
        except FileExistsError:
            pass  # another process made it
        else:
            os.chmod(root, 0o700)  # mkdir's mode is filtered by the umask
        return None
    return home_problem(root)


def make_private(root: str | os.PathLike[str]) -> int:
    """Group and other permissions taken off the home and everything in it (symbolic
    links left alone); how many entries changed."""
    root = Path(root)
    changed = 0
    for p in (root, *root.rglob("*")):
        if p.is_symlink():
            continue
        mode = p.lstat().st_mode
        if mode & 0o077:
            os.chmod(p, mode & 0o7700)
            changed += 1
    return changed
