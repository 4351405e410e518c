"""Events: the one contract between a running job and the console.

A job is a generator of Events; the runner appends each one as a line of JSON to
`run_dir/events.jsonl`; the console tails that file. The file is the whole interface, so a
console that restarts (or another machine's console over a shared disk) re-attaches by
reading it again from offset 0.

Writing: one `os.write` per line on an O_APPEND descriptor, so a reader never sees two
events interleaved and sees each line as soon as it is written (no userspace buffer). The
file is fsync-ed after `done` and `error` only: losing the last progress lines in a power
cut is fine, losing how the run ended is not.

Reading: only complete lines (ending in "\\n") are consumed; a line still being written is
left for the next read. A corrupt line (a writer killed mid-line, a disk full, a hand edit)
is skipped and reported in its place as a `log` event, so one bad byte never stops a tail.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipelines.files import ends_mid_line, open_append, write_all

EVENTS_FILE = "events.jsonl"

EventType = Literal["start", "stage", "progress", "metric", "log", "done", "error"]
Level = Literal["debug", "info", "warning", "error"]
TERMINAL: frozenset[str] = frozenset({"done", "error"})

# Error kinds the runner and the console use; jobs may add their own.
CANCELLED = "cancelled"        # SIGTERM (cancel) or Ctrl+C
CONFIG = "config"              # the job file or something it names is wrong (user-fixable)
STORE = "store"                # the store could not be used (user-fixable)
NOT_IMPLEMENTED = "not_implemented"
EXCEPTION = "exception"        # an unexpected failure: traceback.txt has the rest

_MESSAGE_LIMIT = 2000  # one line; a message longer than this is a log dump, not a message


def one_line(text: Any, limit: int = _MESSAGE_LIMIT) -> str:
    """Collapse whitespace so a message is one line, and cap its length."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


class Event(BaseModel):
    """One thing a job reports. Fields that do not apply to the type stay None (and are
    left out of the JSON line).

    - start:    job (the job kind), name (the run's name), message (optional)
    - stage:    stage (e.g. "load", "embed"), message (optional)
    - progress: current, total (None when unknown), unit, stage (optional)
    - metric:   name, value, step (optional), stage (optional)
    - log:      level, message
    - done:     summary (a JSON-able dict: what the run produced)
    - error:    kind (see the constants above), message (one line)
    """

    model_config = ConfigDict(extra="forbid")

    type: EventType
    ts: float = Field(default_factory=time.time, description="unix time, seconds")
    run_id: str = ""  # the runner stamps it; a job may leave it empty
    job: str | None = None
    stage: str | None = None
    current: int | float | None = None
    total: int | float | None = None
    unit: str | None = None
    name: str | None = None
    value: float | None = None
    step: int | None = None
    level: Level | None = None
    message: str | None = None
    summary: dict[str, Any] | None = None
    kind: str | None = None

    @model_validator(mode="after")
    def _fields_for_type(self) -> Event:
        needs = {
            "stage": ("stage",),
            "progress": ("current",),
            "metric": ("name", "value"),
            "log": ("message",),
            "error": ("kind", "message"),
        }.get(self.type, ())
        missing = [f for f in needs if getattr(self, f) is None]
        if missing:
            raise ValueError(f"a {self.type} event needs {', '.join(missing)}")
        if self.type == "log" and self.level is None:
            self.level = "info"
        if self.type == "done" and self.summary is None:
            self.summary = {}
        return self

    @property
    def terminal(self) -> bool:
        return self.type in TERMINAL

    @property
    def final_status(self) -> str:
        """The run's status once this terminal event is its last: done, cancelled (an
        error of kind `cancelled`) or error; the runner records it, the console reads it."""
        if self.type == "done":
            return "done"
        return "cancelled" if self.kind == CANCELLED else "error"

    def to_json(self) -> str:
        # ensure_ascii=False: persona facts and model replies are Japanese; keep them legible
        return json.dumps(self.model_dump(mode="json", exclude_none=True), ensure_ascii=False,
                          separators=(",", ":"))


# --- constructors: what a job yields ---------------------------------------------------------


def start(job: str, name: str, message: str | None = None) -> Event:
    return Event(type="start", job=job, name=name, message=message)


def stage(name: str, message: str | None = None) -> Event:
    return Event(type="stage", stage=name, message=message)


def progress(current: float, total: float | None = None, unit: str | None = None,
             stage: str | None = None) -> Event:
    return Event(type="progress", current=current, total=total, unit=unit, stage=stage)


def metric(name: str, value: float, step: int | None = None, stage: str | None = None) -> Event:
    return Event(type="metric", name=name, value=float(value), step=step, stage=stage)


def log(message: str, level: Level = "info") -> Event:
    return Event(type="log", level=level, message=str(message))


def done(summary: dict[str, Any] | None = None) -> Event:
    return Event(type="done", summary=dict(summary or {}))


def error(kind: str, message: str) -> Event:
    return Event(type="error", kind=kind, message=one_line(message))


# --- writing -----------------------------------------------------------------------------------


class EventWriter:
    """Appends events to a JSONL file, one write per line. Use as a context manager."""

    def __init__(self, path: str | os.PathLike[str], run_id: str = "") -> None:
        self.path = Path(path)
        self.run_id = run_id
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd: int | None = open_append(self.path)
        # A previous writer that died mid-line left no newline: start on a fresh line, so our
        # first event is not glued to its fragment (the fragment is then one corrupt line);
        # the rule of every resumable log (pipelines.files.ends_mid_line).
        self._needs_newline = ends_mid_line(self.path)

    def write(self, event: Event) -> Event:
        """Stamp the run id (when the job left it empty), append the line, return the event."""
        if self._fd is None:
            raise ValueError(f"{self.path}: event writer is closed")
        if not event.run_id and self.run_id:
            event = event.model_copy(update={"run_id": self.run_id})
        data = (event.to_json() + "\n").encode("utf-8")
        if self._needs_newline:
            data = b"\n" + data
        self._needs_newline = True  # until the whole line is out (a signal may cut us short)
        write_all(self._fd, data)
        self._needs_newline = False
        if event.terminal:
            os.fsync(self._fd)
        return event

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> EventWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- reading -----------------------------------------------------------------------------------


def parse_line(line: bytes | str) -> Event:
    """One JSON line to an Event. Keys this version does not know are dropped (a newer
    job may add fields; an older console still follows it). Raises ValueError."""
    data = json.loads(line)
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    known = {k: v for k, v in data.items() if k in Event.model_fields}
    try:
        return Event.model_validate(known)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "event"
        raise ValueError(f"{where}: {first.get('msg', 'invalid')}") from None


def read_events(path: str | os.PathLike[str], offset: int = 0) -> tuple[list[Event], int]:
    """The complete events after byte `offset`, and the offset to read from next time.

    A partial last line is not consumed. A missing file is no events yet. A corrupt line
    becomes a `log` event (level warning) that names its byte offset. A file shorter than
    `offset` was replaced: it is read again from the start, after a warning.
    """
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            notes: list[Event] = []
            if size < offset:
                notes.append(log(f"{path.name} shrank below byte {offset}; reading it again "
                                 "from the start", level="warning"))
                offset = 0
            fh.seek(offset)
            chunk = fh.read(size - offset)
    except FileNotFoundError:
        return [], offset
    end = chunk.rfind(b"\n")
    if end < 0:
        return notes, offset
    events = notes
    position = offset
    for raw in chunk[: end + 1].split(b"\n")[:-1]:
        line_at = position
        position += len(raw) + 1
        if not raw.strip():
            continue
        try:
            events.append(parse_line(raw))
        except (ValueError, UnicodeDecodeError) as exc:
            events.append(log(f"{path.name}: skipped a corrupt line at byte {line_at}: "
                              f"{one_line(exc, 200)}", level="warning"))
    return events, offset + end + 1


def last_event(path: str | os.PathLike[str], window: int = 64 * 1024) -> Event | None:
    """The last complete, valid event of the file, reading only its end (a status check of
    a long run should not read every line). None when there is none in the window."""
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            fh.seek(max(0, size - window))
            chunk = fh.read(size - max(0, size - window))
    except FileNotFoundError:
        return None
    end = chunk.rfind(b"\n")
    for raw in reversed(chunk[:end].split(b"\n") if end >= 0 else []):
        if raw.strip():
            try:
                return parse_line(raw)
            except (ValueError, UnicodeDecodeError):
                continue  # corrupt, or the first line cut by the window: look further up
    return None


class Tailer:
    """Incremental reader of one events file: poll() returns what is new since last time.
    A fresh Tailer (offset 0) replays the whole run: that is how the console re-attaches."""

    def __init__(self, path: str | os.PathLike[str], offset: int = 0) -> None:
        self.path = Path(path)
        self.offset = offset
        self.last_terminal: Event | None = None

    def poll(self) -> list[Event]:
        events, self.offset = read_events(self.path, self.offset)
        for event in events:
            if event.terminal:
                self.last_terminal = event
        return events

    @property
    def finished(self) -> bool:
        return self.last_terminal is not None


def iter_events(path: str | os.PathLike[str]) -> Iterator[Event]:
    """Every complete event in the file (a finished run's whole story)."""
    events, _ = read_events(path, 0)
    yield from events
