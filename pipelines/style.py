"""Deterministic style checks of a reply against the persona's speech rules: length, the
sentence-final mark, newlines, one sentence, register endings, and how generation stopped.

The lab's fine-tuned model rambled, broke lines and never wrote 。 — and nobody saw it until
reading samples by hand. These checks run on every reply, free and instantly, beside the
LLM judge.
"""

from __future__ import annotations

from dataclasses import dataclass

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
