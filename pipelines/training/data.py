"""Training-data preparation: the fixes the lab's data needed, and a before/after report.

The lab's fine-tuned model never wrote 。 and broke lines because its training replies did
not end with 。 and held newlines. `prepare()` makes every conversation what the model
should learn to write:

- NFC normalisation (a decomposed が and a composed が are one character to a reader, two
  different token sequences to a model);
- leading and trailing whitespace stripped; internal line breaks collapsed (joined without
  a space between Japanese text, with one space between Latin words);
- a final 。 on an assistant reply that ends without sentence-final punctuation — never
  after ！？… or a closing bracket that already ends the sentence, a trailing 、 becomes
  。, and a reply with no Japanese at all is left as it is (。 would be wrong in English);
- exact duplicates removed (after the fixes, so two spellings of one reply are one);
- a length filter on the final reply.

The source file is never written: `prepare_file` refuses an output path that is the input.
"""

from __future__ import annotations

import json
import os
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipelines.config import ConfigError, read_text
from pipelines.files import jsonl_lines, write_jsonl

# Marks that end a sentence already: nothing is added after them.
SENTENCE_FINAL = "。．.！？!?…‥"
CLOSING = "」』）)】〕］]》〉\"'”’"
# Hiragana, katakana (incl. the prolonged sound mark), CJK ideographs, full-width forms.
_JAPANESE = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uff66-\uff9f]")
_LATIN = re.compile(r"[A-Za-z0-9]")
_BREAK = re.compile(r"[ \t\u3000]*(?:\r\n|\r|\n)[\s\u3000]*")
HISTOGRAM_EDGES = (10, 20, 30, 40, 50, 60, 80)


@dataclass
class PrepOptions:
    min_chars: int = 1
    max_chars: int = 120  # an outlier filter: the persona's target is enforced by the data
    add_final_mark: bool = True
    dedupe: bool = True


@dataclass
class Stats:
    """Figures of one side of the report (the replies are the assistant turns)."""

    conversations: int = 0
    replies: int = 0
    ending_maru: float = 0.0      # share of replies ending with 。
    with_newlines: float = 0.0    # share of replies holding a line break
    median_chars: float = 0.0
    histogram: dict[str, int] = field(default_factory=dict)


@dataclass
class PrepReport:
    before: Stats
    after: Stats
    changes: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def text(self) -> str:
        """The report as a few lines of plain text (untrusted content: none is quoted)."""
        b, a = self.before, self.after
        rows = [
            ("conversations", b.conversations, a.conversations),
            ("replies", b.replies, a.replies),
            ("ending with 。", f"{b.ending_maru:.0%}", f"{a.ending_maru:.0%}"),
            ("with line breaks", f"{b.with_newlines:.0%}", f"{a.with_newlines:.0%}"),
            ("median length (chars)", f"{b.median_chars:g}", f"{a.median_chars:g}"),
        ]
        lines = [f"{'':24}{'before':>10}{'after':>10}"]
        lines += [f"{name:24}{str(x):>10}{str(y):>10}" for name, x, y in rows]
        lines.append("reply length histogram (chars):")
        for bucket in a.histogram:
            lines.append(f"  {bucket:>7}  {b.histogram.get(bucket, 0):>6} {a.histogram[bucket]:>6}"
                         f"  {'#' * min(40, a.histogram[bucket])}")
        changed = ", ".join(f"{k} {v}" for k, v in self.changes.items() if v)
        lines.append(f"changes: {changed or 'none'}")
        return "\n".join(lines)


# --- one text ----------------------------------------------------------------------------


def has_japanese(text: str) -> bool:
    return bool(_JAPANESE.search(text))


def _join(match: re.Match[str]) -> str:
    text = match.string
    before = text[match.start() - 1] if match.start() > 0 else ""
    after = text[match.end()] if match.end() < len(text) else ""
    # A space only between Latin words; Japanese is written without one.
    return " " if _LATIN.match(before) and _LATIN.match(after) else ""


def clean_text(text: str) -> str:
    """NFC, outer whitespace stripped, internal line breaks collapsed."""
    text = unicodedata.normalize("NFC", text).strip()
    return _BREAK.sub(_join, text)


def add_final_mark(reply: str) -> str:
    """A final 。 where a Japanese reply ends without sentence-final punctuation."""
    if not reply or not has_japanese(reply):
        return reply
    last = reply[-1]
    if last in SENTENCE_FINAL or last in CLOSING:
        return reply
    if last in "、,，":
        return reply[:-1] + "。"
    return reply + "。"


# --- conversations -----------------------------------------------------------------------


def _replies(rows: Iterable[dict[str, Any]]) -> list[str]:
    return [m["content"] for r in rows for m in r["messages"] if m["role"] == "assistant"]


def _bucket(n: int) -> str:
    low = 0
    for edge in HISTOGRAM_EDGES:
        if n < edge:
            return f"{low}-{edge - 1}"
        low = edge
    return f"{low}+"


def stats(rows: Sequence[dict[str, Any]]) -> Stats:
    replies = _replies(rows)
    n = len(replies) or 1
    lengths = sorted(len(r) for r in replies)
    histogram = {_bucket(edge - 1): 0 for edge in HISTOGRAM_EDGES}
    histogram[f"{HISTOGRAM_EDGES[-1]}+"] = 0
    for length in lengths:
        histogram[_bucket(length)] += 1
    if lengths:
        mid = len(lengths) // 2
        median = lengths[mid] if len(lengths) % 2 else (lengths[mid - 1] + lengths[mid]) / 2
    else:
        median = 0
    return Stats(conversations=len(rows), replies=len(replies),
                 ending_maru=sum(r.endswith("。") for r in replies) / n,
                 with_newlines=sum("\n" in r or "\r" in r for r in replies) / n,
                 median_chars=median, histogram=histogram)


def prepare(rows: Sequence[dict[str, Any]], options: PrepOptions | None = None
            ) -> tuple[list[dict[str, Any]], PrepReport]:
    """The cleaned conversations (new dicts: the input is not modified) and the report."""
    options = options or PrepOptions()
    changes: Counter[str] = Counter()
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for row in rows:
        fixed: Counter[str] = Counter()  # counted only for rows that are kept
        messages = []
        for m in row["messages"]:
            raw = m["content"]
            content = clean_text(raw)
            if "\n" in raw.strip() or "\r" in raw.strip():
                fixed["newlines_collapsed"] += 1
            if unicodedata.normalize("NFC", raw) != raw:
                fixed["nfc_normalised"] += 1
            if raw != raw.strip():
                fixed["whitespace_stripped"] += 1
            if m["role"] == "assistant" and options.add_final_mark:
                marked = add_final_mark(content)
                fixed["final_mark_added"] += marked != content
                content = marked
            messages.append({**m, "content": content})
        reply = messages[-1]["content"] if messages else ""
        if len(reply) < options.min_chars:
            changes["dropped_too_short"] += 1
            continue
        if len(reply) > options.max_chars:
            changes["dropped_too_long"] += 1
            continue
        if options.dedupe:
            key = json.dumps([(m["role"], m["content"]) for m in messages], ensure_ascii=False)
            if key in seen:
                changes["dropped_duplicate"] += 1
                continue
            seen.add(key)
        changes.update(fixed)
        out.append({**row, "messages": messages})
    order = ("nfc_normalised", "whitespace_stripped", "newlines_collapsed", "final_mark_added",
             "dropped_duplicate", "dropped_too_short", "dropped_too_long")
    return out, PrepReport(stats(rows), stats(out), {k: changes.get(k, 0) for k in order})


# --- files -------------------------------------------------------------------------------


def read_conversations(path: str | Path) -> list[dict[str, Any]]:
    """JSON Lines of {"messages": [{"role", "content"}, ...], ...}; errors name the line."""
    path = Path(path)
    rows: list[dict[str, Any]] = []
    for number, line in enumerate(jsonl_lines(read_text(path)), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{where}: invalid JSON: {exc.msg} (column {exc.colno})") from None
        messages = row.get("messages") if isinstance(row, dict) else None
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                and isinstance(m.get("content"), str) for m in messages):
            raise ConfigError(f"{where}: messages: expected a list of {{role, content}} with "
                              "role system, user or assistant")
        if messages[-1]["role"] != "assistant":
            raise ConfigError(f"{where}: messages: the last message must be the assistant's reply")
        rows.append(row)
    if not rows:
        raise ConfigError(f"{path}: no conversations")
    return rows


def prepare_file(source: str | Path, target: str | Path, options: PrepOptions | None = None
                 ) -> PrepReport:
    source, target = Path(source), Path(target)
    if target.exists() and source.exists() and os.path.samefile(source, target):
        raise ConfigError(f"{target}: is the source file; write the prepared data elsewhere "
                          "(the source is never modified)")
    rows, report = prepare(read_conversations(source), options)
    if not rows:
        raise ConfigError(f"{source}: no conversation is left after preparation "
                          f"({report.changes})")
    write_jsonl(target, rows)
    return report
