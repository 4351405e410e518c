"""Figures over a set of replies, from the persona's speech rules: every rate is a share of
replies that pass one of `pipelines.style.check_reply`'s checks, the very checks the
console shows as badges under each reply, so a figure here and the badges there cannot
disagree on the same reply.

`figures(variant, replies, rules)` measures one side (the train job's mini-evaluation, the
prefer job's before/after, the evolve fitness); `style_figures(variant, styles)` is the same
count over per-reply records (`pipelines.style.ReplyStyle`), which the eval job's results
use on its stored replies; `table(before, after, targets)` puts two sides next to each other
as text (the train job's base vs trained table).

One meaning per name: a rate named after a check (`ends`, `register`, `one_sentence`,
`stop`, `newlines`, `length`, in `rates`; by check name in `checks`) is the share PASSING it,
so `newlines` is the share without a line break, in results.json and the report too;
`line_breaks` is the share with one.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from pipelines.config import SpeechRules
from pipelines.evaluation.generate import Reply
from pipelines.style import FLAGS, ReplyStyle, reply_style


@dataclass
class Figures:
    """One variant's figures over n replies. The rate fields keep the names the train job
    has stored since the quick-start (summaries, provenance files, metric events) and read
    the checks as follows:

        ends_maru    share passing "ends"      (ends with the persona's sentence_end, 。)
        ojousama     share passing "register"  (holds one of the persona's `endings`)
        stop_eos     share passing "stop"      (ended on the end-of-turn token)
        line_breaks  share failing "newlines"  (a reply with a line break; train runs
                     before this name stored it as a top-level `newlines`)

    `checks` has every check's pass share by its name (length, ends, newlines, sentences,
    register, stop), over all n replies; `rates` the same shares by the per-reply record's
    names (ends, register, one_sentence, stop, newlines, length: the names results.json
    shows), each over the replies that were checked, `counts` its [passed, checked];
    `style` is the mean of `style_score` per reply; `median_chars` the median length of the
    stripped reply. `judge` and `notes` are filled by the caller."""

    variant: str
    n: int
    ends_maru: float
    ojousama: float
    median_chars: float
    stop_eos: float
    line_breaks: float
    style: float
    checks: dict[str, float] = field(default_factory=dict)
    rates: dict[str, float] = field(default_factory=dict)
    counts: dict[str, list[int]] = field(default_factory=dict)
    judge: float | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def figures(variant: str, replies: Sequence[Reply], rules: SpeechRules) -> Figures:
    """Measure `replies` against the persona's speech `rules` (Persona.speech). No replies
    gives rates of 0."""
    return style_figures(variant, [reply_style(r.text, rules, r.stop) for r in replies])


def style_figures(variant: str, styles: Sequence[ReplyStyle]) -> Figures:
    """The one count behind every style figure, over per-reply records (`reply_style` of
    each reply, or `ReplyStyle.from_record` of stored ones). No records give rates of 0."""
    n = len(styles)

    def passed(name: str) -> int:
        return sum(s.flag(name) is True for s in styles)

    checked = {name: sum(s.flag(name) is not None for s in styles) for name in FLAGS}
    counts = {name: [passed(name), k] for name, k in checked.items() if k}
    check_names = {check: name for name, check in FLAGS.items()}
    made = list(dict.fromkeys(c.name for s in styles for c in s.checks))
    if not made:  # records read back from a file carry no verdicts: their flags, then
        made = [FLAGS[name] for name in FLAGS if checked[name]]
    lengths = [s.chars for s in styles if s.chars is not None]
    return Figures(
        variant=variant,
        n=n,
        ends_maru=passed("ends") / (n or 1),
        ojousama=passed("register") / (n or 1),
        median_chars=float(statistics.median(lengths)) if lengths else 0.0,
        stop_eos=passed("stop") / (n or 1),
        line_breaks=sum(s.newlines is False for s in styles) / (n or 1),
        style=statistics.fmean(s.score for s in styles) if n else 0.0,
        checks={check: passed(check_names[check]) / (n or 1) for check in made},
        rates={name: k / m for name, (k, m) in counts.items()},
        counts=counts,
    )


# (field, row label, how a value is shown)
ROWS = [
    ("ends_maru", "replies ending with 。", "pct"),
    ("ojousama", "persona endings", "pct"),
    ("median_chars", "median length (chars)", "num"),
    ("stop_eos", "stopped on the terminator", "pct"),
    ("line_breaks", "with line breaks", "pct"),
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
