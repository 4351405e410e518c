"""report.md: the headline table, style and facts, the arena, and every reply per question,
as inert Markdown (text from results escaped)."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from pipelines.evaluation.formatting import (
    MISSING,
    fmt_diff,
    fmt_mean,
    fmt_num,
    fmt_p,
    fmt_pairwise,
    fmt_rate,
)
from pipelines.evaluation.report.common import (
    ARENA_HEADER,
    SET_TITLES,
    STYLE_CHECKS,
    _arena_agreement,
    _arena_rows,
    _calibration,
    _labels,
    _meta_rows,
    _reference,
    _score,
    _user_turns,
)

_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>|&~])")


def _md(text: Any) -> str:
    """Text from results as inert Markdown in a table cell: markup characters escaped (a
    reply's `<script>` stays text), line breaks as <br>."""
    text = _MD_SPECIAL.sub(r"\\\1", str(text))
    return text.replace("\r\n", "\n").replace("\n", "<br>")


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def markdown(results: Mapping[str, Any]) -> str:
    meta = results.get("meta", {})
    labels = _labels(results)
    criteria = results.get("criteria", [])
    confidence = meta.get("confidence") or 0.95
    ci = f"{confidence * 100:.0f}% CI"
    out = [f"# Evaluation report — {_md(meta.get('name') or 'eval')}", ""]
    out += [f"- {key}: {_md(value)}" for key, value in _meta_rows(results)]

    out += ["", "## Headline", "",
            f"Judge scores on the 1–7 scale: the mean over questions with its bootstrap {ci}; "
            "Δ is the paired difference to the reference over the questions both have, with "
            "its CI and the Wilcoxon p; pairwise is the judge's choice between this "
            "combination's reply and the reference's (both orders; orders that disagree count "
            "as a tie). — means missing (failed verdicts and broken replies are counted as "
            "missing, never as 0).", ""]
    rows = []
    for head in results.get("headline", []):
        first = True
        for crit in criteria:
            name = crit["name"]
            stat = head.get("criteria", {}).get(name)
            label = _md(head.get("label") or labels.get(head["combo"], head["combo"]))
            if head.get("reference"):
                label = f"**{label}** (reference)"
            diff = (stat or {}).get("diff")
            rows.append([
                label if first else "",
                _md(crit.get("title") or name),
                _md(_calibration(crit)),
                fmt_mean(stat),
                "reference" if head.get("reference") else fmt_diff(diff),
                "" if head.get("reference") else fmt_p((diff or {}).get("p")),
                f"{(stat or {}).get('n', 0)} ({(stat or {}).get('missing', 0)} missing)",
                "reference" if head.get("reference")
                else fmt_pairwise(head.get("pairwise", {}).get(name)),
            ])
            first = False
    out += _md_table(["combination", "criterion", "calibration", f"mean [{ci}]",
                      f"Δ vs reference [{ci}]", "p", "scored", "pairwise vs reference"], rows)

    out += ["", "### Style and facts", "",
            "Share of replies passing each of the console's style checks ("
            + "; ".join(f"{short}: {long}" for _, short, long in STYLE_CHECKS)
            + f"), with its Wilson {ci}; facts: share of fact questions whose reply holds "
            "an expected fact.", ""]
    rows = []
    for head in results.get("headline", []):
        style = head.get("style") or {}
        label = _md(head.get("label") or labels.get(head["combo"], head["combo"]))
        rows.append([label + (" (reference)" if head.get("reference") else ""),
                     str(head.get("questions", MISSING))]
                    + [fmt_rate(style.get(key)) for key, _, _ in STYLE_CHECKS]
                    + [fmt_num(style.get("median_chars"), 0), fmt_rate(head.get("facts"))])
    out += _md_table(["combination", "questions"] + [short for _, short, _ in STYLE_CHECKS]
                     + ["median chars", "facts"], rows)

    out += _md_arena(results)

    out += ["", "## Per question", "",
            "Every combination's reply side by side with its scores and its pairwise outcome "
            "against the reference; spread is the largest difference between the "
            "combinations' mean scores.", ""]
    combos = [c["id"] for c in results.get("combos", [])]
    rows = []
    for i, q in enumerate(results.get("questions", []), 1):
        question = _md(q.get("question", ""))
        turns = _user_turns(q.get("transcript"))
        if q.get("set") == "scripts" and turns:
            question = "<br>".join(f"{n}. {_md(t)}" for n, t in enumerate(turns, 1))
        rows.append([str(i), _md(SET_TITLES.get(q.get("set"), q.get("set", ""))),
                     _md(q.get("id", "")), question, fmt_num(q.get("disagreement"))]
                    + [_md_reply(q.get("replies", {}).get(c), criteria, c == _reference(results))
                       for c in combos])
    out += _md_table(["#", "set", "id", "question", "spread"]
                     + [_md(labels[c]) for c in combos], rows)
    return "\n".join(out) + "\n"


def _md_reply(reply: Mapping[str, Any] | None, criteria: Sequence[Mapping[str, Any]],
              is_reference: bool) -> str:
    if reply is None:
        return MISSING
    if reply.get("error"):
        text = f"*missing — broken reply: {_md(reply['error'])}*"
        if reply.get("text"):
            text += f"<br>{_md(reply['text'])}"
    else:
        text = _md(reply.get("text", "")) or MISSING
    scores = reply.get("scores") or {}
    parts = [f"{_md(c.get('title') or c['name'])} {_score(scores.get(c['name']))}"
             for c in criteria]
    text += "<br>**scores** " + " · ".join(parts)
    if not is_reference and reply.get("pairwise"):
        pair = reply["pairwise"]
        text += "<br>**vs reference** " + " · ".join(
            f"{_md(c.get('title') or c['name'])} {pair.get(c['name']) or MISSING}"
            for c in criteria if c["name"] in pair)
    if reply.get("stop") not in (None, "eos"):
        text += f"<br>stopped: {_md(reply['stop'])}"
    if reply.get("fact_hit") is not None:
        text += "<br>fact: " + ("hit" if reply["fact_hit"] else "miss")
    return text


def _md_arena(results: Mapping[str, Any]) -> list[str]:
    tables = _arena_rows(results)
    if not tables:
        return []
    out = ["", "### Arena", "", "Bradley–Terry ratings per variant (log-strength, mean 0; "
           "ties count half) with bootstrap 95% CIs."]
    for _, title, rows in tables:
        out += ["", f"**{_md(title)}**", ""]
        out += _md_table(ARENA_HEADER, [[_md(c) for c in row] for row in rows])
    agreement = _arena_agreement(results)
    if agreement:
        out += ["", _md(agreement)]
    return out
