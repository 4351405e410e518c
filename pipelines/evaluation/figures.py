"""Figures over a set of replies, from the persona's speech rules: every rate is a share of
replies that pass one of `pipelines.style.check_reply`'s checks, the very checks the
console shows as badges under each reply, so a figure here and the badges there cannot
disagree on the same reply.

`figures(variant, replies, rules)` measures one side; `table(before, after, targets)` puts
two sides next to each other as text (the train job's base vs trained table).
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from pipelines.config import SpeechRules
from pipelines.evaluation.generate import Reply
from pipelines.style import check_reply, style_score


@dataclass
class Figures:
    """One variant's figures over n replies. The rate fields keep the names the train job
    has stored since the quick-start (summaries, provenance files, metric events) and read
    the checks as follows:

        ends_maru   share passing "ends"      (ends with the persona's sentence_end, 。)
        ojousama    share passing "register"  (holds one of the persona's `endings`)
        stop_eos    share passing "stop"      (ended on the end-of-turn token)
        newlines    share failing "newlines"  (a reply with a line break)

    `checks` has every check's pass share by its name (length, ends, newlines, sentences,
    register, stop); `style` is the mean of `style_score` per reply; `median_chars` the
    median length of the stripped reply. `judge` and `notes` are filled by the caller."""

    variant: str
    n: int
    ends_maru: float
    ojousama: float
    median_chars: float
    stop_eos: float
    newlines: float
    style: float
    checks: dict[str, float] = field(default_factory=dict)
    judge: float | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def figures(variant: str, replies: Sequence[Reply], rules: SpeechRules) -> Figures:
    """Measure `replies` against the persona's speech `rules` (Persona.speech). No replies
    gives rates of 0."""
    verdicts = [check_reply(r.text, rules, r.stop) for r in replies]
    n = len(replies)

    def passed(name: str) -> float:
        return sum(c.ok for checks in verdicts for c in checks if c.name == name) / (n or 1)

    names = list(dict.fromkeys(c.name for checks in verdicts for c in checks))
    lengths = [len(r.text.strip()) for r in replies]
    return Figures(
        variant=variant,
        n=n,
        ends_maru=passed("ends"),
        ojousama=passed("register"),
        median_chars=float(statistics.median(lengths)) if lengths else 0.0,
        stop_eos=passed("stop"),
        newlines=(1.0 - passed("newlines")) if n else 0.0,
        style=statistics.fmean(style_score(checks) for checks in verdicts) if n else 0.0,
        checks={name: passed(name) for name in names},
    )


# (field, row label, how a value is shown)
ROWS = [
    ("ends_maru", "replies ending with 。", "pct"),
    ("ojousama", "persona endings", "pct"),
    ("median_chars", "median length (chars)", "num"),
    ("stop_eos", "stopped on the terminator", "pct"),
    ("newlines", "with line breaks", "pct"),
    ("style", "style checks passed", "pct"),
]


def table(before: Figures, after: Figures, targets: Mapping[str, str] | None = None) -> str:
    """Two sides as a text table, one row per figure (and the judge's mean when either
    side has one), with an optional target column keyed by field name ("≥ 80%")."""
    targets = targets or {}

    def show(value: float, how: str) -> str:
        return f"{value:.0%}" if how == "pct" else f"{value:g}"

    rows = [(label, show(getattr(before, key), how), show(getattr(after, key), how),
             targets.get(key, "")) for key, label, how in ROWS]
    if before.judge is not None or after.judge is not None:
        rows.append(("judge (personality, 1-7)", _num(before.judge), _num(after.judge),
                     targets.get("judge", "")))
    width = max(len(before.variant), len(after.variant), 8) + 2
    lines = [f"{'':28}{before.variant:>{width}}{after.variant:>{width}}  target"]
    lines += [f"{name:28}{b:>{width}}{a:>{width}}  {t}".rstrip() for name, b, a, t in rows]
    lines += [f"note: {note}" for note in before.notes + after.notes]
    return "\n".join(lines)


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"
