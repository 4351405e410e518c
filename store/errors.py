"""StoreError, and the translation of raw lance / pyarrow / OS failures into it.

The console shows str(StoreError) to the user as-is, so it is always ONE line:
"store at PATH <what is wrong>; <what to do>". The original exception stays
chained (`raise ... from exc`) for logs and debugging.
"""

from __future__ import annotations

import errno
import re
from pathlib import Path

# Hints, shared so the same problem always gets the same advice.
HINT_WRITABLE = "check permissions or set KYARA_STORE to a writable directory"
HINT_SPACE = "free some disk space or set KYARA_STORE to a directory on another disk"
HINT_DIRECTORY = "set KYARA_STORE to a directory"
HINT_DAMAGED = "the store may be damaged: move it aside (or set KYARA_STORE) and try again"
HINT_UPGRADE = "upgrade kyara"
HINT_BUG = "this is a bug in the caller; see the store/ docstrings"


class StoreError(Exception):
    """Any failure of the store. str() is one line naming the store path and a hint."""

    def __init__(self, path: str | Path, problem: str, hint: str) -> None:
        self.path = str(path)
        self.problem = _one_line(problem)
        self.hint = _one_line(hint)
        super().__init__(f"store at {self.path} {self.problem}; {self.hint}")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


# lance reports OS failures only inside its message text, either as "... (os error 28)" or,
# from Rust Debug output, as "Os { code: 13, kind: PermissionDenied, ... }".
_OS_ERROR = re.compile(r"os error (\d+)|Os \{ code: (\d+)")
_RUST_LOCATION = re.compile(r",?\s*/\S+\.rs:\d+:\d+")
_LANCE_PREFIX = re.compile(r"^(lance error: |External error: )?(LanceError\(\w+\): )?")


def short_reason(exc: BaseException, limit: int = 160) -> str:
    """The gist of a lance/pyarrow message: first line, no Rust source paths."""
    text = _one_line(_RUST_LOCATION.sub("", str(exc).split("\n", 1)[0]))
    text = _LANCE_PREFIX.sub("", text) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _errno_of(exc: BaseException) -> int | None:
    if isinstance(exc, OSError) and exc.errno is not None:
        return exc.errno
    match = _OS_ERROR.search(str(exc))
    return int(match.group(1) or match.group(2)) if match else None


def translate(exc: BaseException, path: str | Path, doing: str) -> StoreError:
    """Turn a raw failure while `doing` (e.g. "write table 'messages'") into a StoreError."""
    if isinstance(exc, StoreError):
        return exc
    code = _errno_of(exc)
    if code in (errno.ENOSPC, errno.EDQUOT):
        return StoreError(path, f"is out of disk space (could not {doing})", HINT_SPACE)
    if code == errno.EROFS:
        return StoreError(path, f"is on a read-only file system (could not {doing})",
                          HINT_WRITABLE)
    if code in (errno.EACCES, errno.EPERM):
        return StoreError(path, f"is not accessible: permission denied (could not {doing})",
                          HINT_WRITABLE)
    if code == errno.ENOTDIR:
        return StoreError(path, "is not a directory (a file is in the way)", HINT_DIRECTORY)
    return StoreError(path, f"could not {doing}: {short_reason(exc)}", HINT_DAMAGED)
