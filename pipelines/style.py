"""Deterministic style checks of a reply against the persona's speech rules: length, the
sentence-final mark, newlines, one sentence, register endings, and how generation stopped.

The lab's fine-tuned model rambled, broke lines and never wrote 。 — and nobody saw it until
reading samples by hand. These checks run on every reply, free and instantly, beside the
LLM judge.

`reply_style(text, rules, stop)` is the one per-reply style record (`ReplyStyle`): the
console's badges show its checks, the eval job stores its `record()` in replies.jsonl, and
`pipelines.evaluation.figures` counts it. Every flag is named after what a report shows and
means "passes that check": `newlines` True is a reply WITHOUT a line break.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pipelines.config import SpeechRules

SENTENCE_END = "。！？!?…"


@dataclass(frozen=True)
class StyleCheck:
    name: str  # length | ends | newlines | sentences | register | stop
    ok: bool
    detail: str


def check_reply(text: str, rules: SpeechRules, stop_reason: str | None = None) -> list[StyleCheck]:
    body = text.strip()
    checks = [
        StyleCheck("length", 0 < len(body) <= rules.max_chars,
                   f"{len(body)} chars (target {rules.target_chars}, max {rules.max_chars})"),
        StyleCheck("ends", body.endswith(rules.sentence_end),
                   f"ends with {body[-1:] or 'nothing'!r}, expected {rules.sentence_end!r}"),
        StyleCheck("newlines", "\n" not in body,
                   f"{body.count(chr(10))} line break(s)" if "\n" in body else "none"),
    ]
    inner = sum(body[:-1].count(mark) for mark in SENTENCE_END)
    checks.append(StyleCheck("sentences", inner == 0, f"{inner + 1 if body else 0} sentence(s)"))
    register = any(ending in body for ending in rules.endings)
    checks.append(StyleCheck("register", register,
                             "persona endings present" if register
                             else f"none of {', '.join(rules.endings)}"))
    if stop_reason is not None:
        checks.append(StyleCheck("stop", stop_reason == "eos",
                                 f"stopped by {stop_reason}" + (
                                     "" if stop_reason == "eos"
                                     else " (the turn terminator was not produced)")))
    return checks


def style_score(checks: list[StyleCheck]) -> float:
    """Share of checks passed, 0..1: a cheap fitness term for curation and merging."""
    return sum(c.ok for c in checks) / len(checks) if checks else 0.0


# The per-reply record's flags, by the name reports show -> the check of `check_reply` each
# one reads (they differ only for one_sentence).
FLAGS = {"ends": "ends", "register": "register", "one_sentence": "sentences", "stop": "stop",
         "newlines": "newlines", "length": "length"}


@dataclass(frozen=True)
class ReplyStyle:
    """One reply's style. Each flag is True where the reply passes that check (ends: ends
    with the persona's sentence_end; register: holds one of its endings; one_sentence;
    stop: ended on the end-of-turn token; newlines: has NO line break; length: 1..max_chars
    characters), None where it was not checked (stop without a stop reason, a flag an older
    stored record lacks). `chars` is the stripped reply's length; `checks` the verdicts
    themselves, with their details (the badges), when made from a reply's text."""

    ends: bool | None = None
    register: bool | None = None
    one_sentence: bool | None = None
    stop: bool | None = None
    newlines: bool | None = None
    length: bool | None = None
    chars: int | None = None
    checks: tuple[StyleCheck, ...] = field(default=(), compare=False, repr=False)

    def flag(self, name: str) -> bool | None:
        return getattr(self, name)

    @property
    def score(self) -> float:
        """Share of the checks made that passed: `style_score` of the verdicts."""
        made = [f for f in (self.flag(name) for name in FLAGS) if f is not None]
        return sum(made) / len(made) if made else 0.0

    def record(self) -> dict[str, Any]:
        """The flags and the length, as a reply record stores them (replies.jsonl)."""
        return {**{name: self.flag(name) for name in FLAGS if self.flag(name) is not None},
                "chars": self.chars}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> ReplyStyle:
        """A stored record back (anything not a boolean flag, or a length that is not a
        number, read as not checked)."""
        flags = {name: record.get(name) if isinstance(record.get(name), bool) else None
                 for name in FLAGS}
        chars = record.get("chars")
        number = isinstance(chars, (int, float)) and not isinstance(chars, bool)
        return cls(**flags, chars=chars if number else None)


def reply_style(text: str, rules: SpeechRules, stop_reason: str | None = None) -> ReplyStyle:
    """The style record of one reply: `check_reply`'s verdicts read as flags."""
    checks = check_reply(text, rules, stop_reason)
    ok = {c.name: c.ok for c in checks}
    return ReplyStyle(**{name: ok.get(check) for name, check in FLAGS.items()},
                      chars=len(text.strip()), checks=tuple(checks))
