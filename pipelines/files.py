"""Every write, append, rename and JSON Lines read of the project, in one place.

A reader (a console screen, a resumed job, `kyara report`) never sees half a file: the
text goes to a temporary name beside the target, is flushed to disk, then renamed over it
(`os.replace` is atomic on one file system). The temporary file is opened with "x" rather
than made by mkstemp, so the result has the umask's mode, not 0600. A file or folder made
aside under another name is moved into place with `rename` / `replace_folder`.

Resumable logs (JSON Lines appended record by record) share one torn-line rule: a writer
killed mid-line leaves no trailing newline, so the next append first ends that fragment
with a newline (`ends_mid_line`, used by `append_jsonl` and the job's EventWriter); the
fragment is then one corrupt line, which the readers skip or report, and the new record is
whole on its own line. A log whose reader must refuse corrupt lines drops the fragment
before its first append instead (`drop_torn_tail`).

JSON Lines are read with `jsonl_lines`: records split on "\n" only (never
`str.splitlines`, which also splits on U+2028, U+2029 and U+0085, characters a JSON string
written with ensure_ascii off holds raw), a UTF-8 byte order mark accepted. This module
imports the standard library only, so any layer above store/ can use it.
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
    return write_bytes_atomic(path, text.encode("utf-8"))  # UTF-8, newlines as written


def jsonl_text(rows: Iterable[Mapping[str, Any]]) -> str:
    """One JSON object per line, UTF-8 kept as text (ensure_ascii off)."""
    return "".join(json.dumps(dict(row), ensure_ascii=False) + "\n" for row in rows)


def write_jsonl(path: str | Path, rows: Iterable[Mapping[str, Any]]) -> Path:
    """JSON Lines at `path`, whole or not at all."""
    return write_atomic(path, jsonl_text(rows))


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """`data` at `path` (its folder made if missing), whole or not at all."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    return path


def json_text(data: Any, *, indent: int | None = 2, allow_nan: bool = True) -> str:
    """`data` as JSON (UTF-8 kept as text), one trailing newline."""
    return json.dumps(data, ensure_ascii=False, indent=indent, allow_nan=allow_nan) + "\n"


def write_json(path: str | Path, data: Any, *, indent: int | None = 2,
               allow_nan: bool = True) -> Path:
    """`data` as JSON at `path` (indented, newline-terminated), whole or not at all."""
    return write_atomic(path, json_text(data, indent=indent, allow_nan=allow_nan))


# --- renames: a file or folder made aside, moved into place ---------------------------------


def rename(src: str | Path, dst: str | Path) -> Path:
    """`src` (a file or a folder) under the name `dst`, in one atomic rename on one file
    system; a file at `dst` (or an empty folder) is replaced."""
    os.replace(src, dst)
    return Path(dst)


def replace_folder(new: str | Path, target: str | Path) -> Path:
    """`target` becomes the folder `new` by renames only: the old folder (if any) is moved
    aside first and removed after, so no half-written folder is ever under its name."""
    import shutil

    new, target = Path(new), Path(target)
    old = target.with_name(f".{target.name}.old.{os.getpid()}")
    if target.exists():
        os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)
    return target


# --- appends: resumable logs --------------------------------------------------------------


def ends_mid_line(path: str | Path) -> bool:
    """Whether the file's last byte is not a newline (a writer killed mid-line): the next
    append must start with one. A missing or empty file does not."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            if fh.tell() == 0:
                return False
            fh.seek(-1, os.SEEK_END)
            return fh.read(1) != b"\n"
    except OSError:
        return False


def open_append(path: str | Path) -> int:
    """A write descriptor on `path` that appends (O_APPEND: each write lands whole at the
    end), the file made with the umask's mode if missing. The caller closes it."""
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)


def drop_torn_tail(path: str | Path) -> bytes:
    """The file's complete lines, the torn last line (if any) cut off the file itself.
    For a log whose reader refuses a corrupt line (the evolve search, whose records must
    follow one another): there the fragment is dropped, not ended. A missing file is b""."""
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        return b""
    end = raw.rfind(b"\n") + 1
    if end < len(raw):
        with open(path, "r+b") as fh:
            fh.truncate(end)
    return raw[:end]


def write_all(fd: int, data: bytes) -> None:
    """Every byte of `data` to the descriptor (os.write may write less than asked)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def append_jsonl(path: str | Path, *records: Mapping[str, Any], fsync: bool = True) -> None:
    """The records appended to a JSON Lines log, one line each, in one write on an
    O_APPEND descriptor (made with the umask's mode, its folder if missing); a torn last
    line is ended first, so the first record is not glued to it. Fsynced unless told not."""
    if not records:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = jsonl_text(records).encode("utf-8")
    if ends_mid_line(path):
        data = b"\n" + data
    fd = open_append(path)
    try:
        write_all(fd, data)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


# --- reading JSON Lines ---------------------------------------------------------------------


def jsonl_lines(text: str | bytes) -> list[str]:
    """The lines of a JSON Lines text: split on "\n" only (a raw U+2028 / U+2029 / U+0085
    inside a JSON string stays in its record), a leading byte order mark and each line's
    trailing "\r" dropped, the empty piece after a final newline left out. Bytes are
    decoded as UTF-8 (strict)."""
    if isinstance(text, bytes):
        text = text.decode("utf-8-sig")
    elif text.startswith("\ufeff"):
        text = text[1:]
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def read_jsonl_lines(path: str | Path) -> list[str]:
    """`jsonl_lines` of the file at `path` (UTF-8, a byte order mark accepted); OSError
    and UnicodeDecodeError as `open` raises them."""
    return jsonl_lines(Path(path).read_bytes())
