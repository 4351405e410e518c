"""Files written whole or not at all: the one atomic writer of text and JSON Lines that
jobs, exports and reports share.

A reader (a console screen, a resumed job, `kyara report`) never sees half a file: the
text goes to a temporary name beside the target, is flushed to disk, then renamed over it
(`os.replace` is atomic on one file system). The temporary file is opened with "x" rather
than made by mkstemp, so the result has the umask's mode, not 0600. This module imports
the standard library only, so any layer can use it.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any


def write_atomic(path: str | Path, text: str) -> Path:
    """`text` at `path` (its folder made if missing), whole or not at all."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "x", encoding="utf-8", newline="\n") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    return path


def jsonl_text(rows: Iterable[Mapping[str, Any]]) -> str:
    """One JSON object per line, UTF-8 kept as text (ensure_ascii off)."""
    return "".join(json.dumps(dict(row), ensure_ascii=False) + "\n" for row in rows)


def write_jsonl(path: str | Path, rows: Iterable[Mapping[str, Any]]) -> Path:
    """JSON Lines at `path`, whole or not at all."""
    return write_atomic(path, jsonl_text(rows))
