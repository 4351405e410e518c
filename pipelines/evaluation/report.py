"""The eval run's report: results.json (built by `pipelines.evaluation.results`) written as
`report.md` and a self-contained `report.html`, for people to read.

    write_report(results, folder) -> (report.md, report.html)   both written atomically
    markdown(results) -> str                                     the report.md text
    html_page(results) -> str                                    the report.html text

The page carries everything it shows: inline CSS, inline <svg> plots (matplotlib, text kept
as text so the browser's fonts draw the Japanese), one inline script for the per-question
table's filter and sort, and no URL of any kind, so it reads the same copied off the server.
Every text from results (replies are model output, reasons are anyone's) is escaped, and a
missing value (a failed verdict, a broken reply) is shown as "—", never as 0.

matplotlib is imported inside the plotting functions only: importing this module stays
cheap (the console lists reports without drawing them).
"""

from __future__ import annotations

import html
import io
import re
import warnings
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from pipelines.files import write_atomic

MISSING = "—"
LAB_QUESTION = "あなたの名前はなんですか?"  # the lab's first question, asked of every model
SET_TITLES = {"heldout": "held-out", "probes": "probes", "scripts": "scripts",
              "simulated": "simulated"}
# The console's style checks (pipelines.style.check_reply); each figure is the share of
# replies that PASS the check.
STYLE_CHECKS = [
    ("ends", "ends with 。", "ends with the persona's sentence mark"),
    ("register", "register", "holds one of her endings"),
    ("one_sentence", "one sentence", "a single sentence"),
    ("stop", "EOS stop", "ended on the end-of-turn token"),
    ("newlines", "no line break", "no line break in the reply"),
]
OUTCOMES = ("win", "tie", "loss")


# -- writing ----------------------------------------------------------------------------------

def write_report(results: Mapping[str, Any], folder: Path) -> tuple[Path, Path]:
    """Write `report.md` and `report.html` for `results` into `folder` (made if missing).
    Each file is written to a temporary name beside it and renamed over the old one, so a
    reader never sees half a report."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    md_text = markdown(results)
    html_text = html_page(results)
    md_path, html_path = folder / "report.md", folder / "report.html"
    write_atomic(md_path, md_text)
    write_atomic(html_path, html_text)
    return md_path, html_path


# -- formatting (shared by both files) ----------------------------------------------------

def _num(x: float | None, digits: int = 2) -> str:
    return MISSING if x is None else f"{x:.{digits}f}"


def fmt_mean(stat: Mapping[str, Any] | None) -> str:
    """`5.12 [4.80, 5.41]`; `—` when nothing was scored."""
    if not stat or stat.get("mean") is None:
        return MISSING
    mean, lo, hi = stat["mean"], stat.get("lo"), stat.get("hi")
    if lo is None or hi is None:
        return f"{mean:.2f}"
    return f"{mean:.2f} [{lo:.2f}, {hi:.2f}]"


def fmt_diff(diff: Mapping[str, Any] | None) -> str:
    """`+0.31 [-0.05, +0.66]`: combo minus reference, paired over questions."""
    if not diff or diff.get("mean") is None:
        return MISSING
    mean, lo, hi = diff["mean"], diff.get("lo"), diff.get("hi")
    if lo is None or hi is None:
        return f"{mean:+.2f}"
    return f"{mean:+.2f} [{lo:+.2f}, {hi:+.2f}]"


def fmt_p(p: float | None) -> str:
    if p is None:
        return MISSING
    return "p<0.001" if p < 0.001 else f"p={p:.3f}"


def fmt_rate(rate: Mapping[str, Any] | None) -> str:
    """`82% [74, 88]` (Wilson interval); `—` when nothing was counted (the contract writes
    null for n == 0)."""
    if not rate or not rate.get("n"):
        return MISSING
    return (f"{rate['rate'] * 100:.0f}% "
            f"[{rate['lo'] * 100:.0f}, {rate['hi'] * 100:.0f}]")


def fmt_pairwise(pair: Mapping[str, Any] | None) -> str:
    """`win 45% [35, 55] · tie 20% [12, 31] · loss 35% [25, 46] (n=40)`."""
    if not pair or not pair.get("n"):
        return MISSING
    parts = [f"{o} {fmt_rate(pair.get(o))}" for o in OUTCOMES]
    return " · ".join(parts) + f" (n={pair['n']})"


def fmt_date(created: str | None) -> str:
    if not created:
        return MISSING
    try:
        when = datetime.fromisoformat(str(created).replace("Z", "+00:00"))
    except ValueError:
        return str(created)
    return when.strftime("%Y-%m-%d %H:%M") + (f" {when.tzname()}" if when.tzinfo else "")


def _calibration(criterion: Mapping[str, Any]) -> str:
    return str(criterion.get("calibration") or "uncalibrated")


def _labels(results: Mapping[str, Any]) -> dict[str, str]:
    return {c["id"]: str(c.get("label") or c["id"]) for c in results.get("combos", [])}


def _reference(results: Mapping[str, Any]) -> str | None:
    return results.get("meta", {}).get("reference")


def _user_turns(transcript: Sequence[Any] | None) -> list[str]:
    """The user turns of a script (the contract gives messages; plain strings pass too)."""
    turns = []
    for turn in transcript or []:
        if isinstance(turn, Mapping):
            if turn.get("role", "user") == "user":
                turns.append(str(turn.get("content", "")))
        else:
            turns.append(str(turn))
    return turns


def _meta_rows(results: Mapping[str, Any]) -> list[tuple[str, str]]:
    meta = results.get("meta", {})
    judge = meta.get("judge") or {}
    judge_text = str(judge.get("name") or MISSING)
    if judge.get("model") and judge.get("model") != judge.get("name"):
        judge_text += f" (model {judge['model']})"
    reference = _reference(results)
    ref_text = f"{_labels(results).get(reference, reference)} ({reference})" if reference \
        else MISSING
    confidence = meta.get("confidence")
    return [
        ("persona", str(meta.get("persona") or MISSING)),
        ("judge", judge_text),
        ("date", fmt_date(meta.get("created"))),
        ("reference", ref_text),
        ("seed", str(meta.get("seed", MISSING))),
        ("samples per question", str(meta.get("samples", MISSING))),
        ("confidence", f"{confidence * 100:.0f}%" if confidence else MISSING),
        ("question sets", ", ".join(SET_TITLES.get(s, s) for s in results.get("sets", []))
         or MISSING),
    ]


# -- report.md ----------------------------------------------------------------------------

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
                    + [_num(style.get("median_chars"), 0), fmt_rate(head.get("facts"))])
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
                     _md(q.get("id", "")), question, _num(q.get("disagreement"))]
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


def _score(score: int | float | None) -> str:
    return MISSING if score is None else f"{score:g}"


# -- report.html --------------------------------------------------------------------------

def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def html_page(results: Mapping[str, Any]) -> str:
    meta = results.get("meta", {})
    title = f"Evaluation report — {meta.get('name') or 'eval'}"
    plots = render_plots(results)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title>",
        f"<style>{_CSS}</style>",
        "</head>",
        "<body>",
        f"<header><h1>{_e(title)}</h1>",
        '<dl class="meta">'
        + "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in _meta_rows(results))
        + "</dl></header>",
        "<main>",
        _html_headline(results),
        _html_style_table(results),
        _html_arena(results),
        '<section id="plots"><h2>Plots</h2>',
        *[f'<figure id="plot-{_e(key)}">{svg}<figcaption>{_e(caption)}</figcaption></figure>'
          for key, caption, svg in plots],
        "</section>",
        _html_questions(results),
        "</main>",
        f"<script>{_SCRIPT}</script>",
        "</body>",
        "</html>",
    ]
    return "\n".join(parts) + "\n"


def _html_headline(results: Mapping[str, Any]) -> str:
    labels = _labels(results)
    criteria = results.get("criteria", [])
    confidence = results.get("meta", {}).get("confidence") or 0.95
    ci = f"{confidence * 100:.0f}% CI"
    rows = []
    for head in results.get("headline", []):
        label = head.get("label") or labels.get(head["combo"], head["combo"])
        is_ref = bool(head.get("reference"))
        for i, crit in enumerate(criteria):
            name = crit["name"]
            stat = head.get("criteria", {}).get(name) or {}
            diff = stat.get("diff")
            cells = []
            if i == 0:
                ref_tag = ' <span class="tag ref">reference</span>' if is_ref else ""
                cells.append(f'<th scope="rowgroup" rowspan="{len(criteria)}">{_e(label)}'
                             f'{ref_tag}<div class="sub">{head.get("questions", 0)} questions'
                             "</div></th>")
            calibration = _calibration(crit)
            cal_class = "cal" if calibration.startswith("calibrated") else "uncal"
            cells.append(f"<td>{_e(crit.get('title') or name)}</td>")
            cells.append(f'<td class="{cal_class}">{_e(calibration)}</td>')
            cells.append(f'<td class="num">{_e(fmt_mean(stat))}</td>')
            if is_ref:
                cells.append('<td class="muted" colspan="2">reference</td>')
            else:
                cells.append(f'<td class="num {_sign_class(diff)}">{_e(fmt_diff(diff))}</td>')
                cells.append(f'<td class="num">{_e(fmt_p((diff or {}).get("p")))}</td>')
            missing = stat.get("missing", 0)
            cells.append(f'<td class="num">{stat.get("n", 0)}'
                         + (f' <span class="warn">({missing} missing)</span>' if missing else "")
                         + "</td>")
            cells.append('<td class="muted">reference</td>' if is_ref
                         else f"<td>{_html_pairwise(head.get('pairwise', {}).get(name))}</td>")
            row_class = ' class="group-start"' if i == 0 else ""
            rows.append(f"<tr{row_class}>{''.join(cells)}</tr>")
    header = "".join(f"<th>{_e(h)}</th>" for h in [
        "combination", "criterion", "calibration", f"mean [{ci}]", f"Δ vs reference [{ci}]",
        "p", "scored", "pairwise vs reference (win · tie · loss)"])
    return ('<section id="headline"><h2>Headline</h2>'
            f"<p>Judge scores on the 1–7 scale: the mean over questions with its bootstrap {ci}; "
            "Δ is the paired difference to the reference over the questions both have, with its "
            "CI and the Wilcoxon p; pairwise is the judge's choice between this combination's "
            "reply and the reference's, asked in both orders (orders that disagree count as a "
            "tie). — means missing: failed verdicts and broken replies are never counted as 0."
            "</p>"
            f'<div class="scroll"><table class="headline"><thead><tr>{header}</tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table></div></section>")


def _sign_class(diff: Mapping[str, Any] | None) -> str:
    """`up`/`down` when the interval excludes 0."""
    if not diff or diff.get("lo") is None or diff.get("hi") is None:
        return ""
    return "up" if diff["lo"] > 0 else "down" if diff["hi"] < 0 else ""


def _html_pairwise(pair: Mapping[str, Any] | None) -> str:
    if not pair or not pair.get("n"):
        return MISSING
    bar = "".join(
        f'<span class="seg {o}" style="width:{(pair.get(o) or {}).get("rate", 0) * 100:.1f}%">'
        "</span>" for o in OUTCOMES)
    text = " · ".join(f'<span class="{o}-text">{o} {_e(fmt_rate(pair.get(o)))}</span>'
                      for o in OUTCOMES)
    return f'<div class="wtl">{bar}</div><div class="sub">{text} (n={pair["n"]})</div>'


def _html_style_table(results: Mapping[str, Any]) -> str:
    labels = _labels(results)
    confidence = results.get("meta", {}).get("confidence") or 0.95
    rows = []
    for head in results.get("headline", []):
        style = head.get("style") or {}
        label = head.get("label") or labels.get(head["combo"], head["combo"])
        ref_tag = ' <span class="tag ref">reference</span>' if head.get("reference") else ""
        cells = [f"<th scope=\"row\">{_e(label)}{ref_tag}</th>",
                 f'<td class="num">{_e(head.get("questions", MISSING))}</td>']
        cells += [f'<td class="num">{_e(fmt_rate(style.get(key)))}</td>'
                  for key, _, _ in STYLE_CHECKS]
        cells += [f'<td class="num">{_e(_num(style.get("median_chars"), 0))}</td>',
                  f'<td class="num">{_e(fmt_rate(head.get("facts")))}</td>']
        rows.append(f"<tr>{''.join(cells)}</tr>")
    header = "".join(f"<th>{_e(h)}</th>" for h in
                     ["combination", "questions"] + [s for _, s, _ in STYLE_CHECKS]
                     + ["median chars", "facts"])
    legend = "; ".join(f"<b>{_e(short)}</b>: {_e(long)}" for _, short, long in STYLE_CHECKS)
    return ('<section id="style"><h3>Style and facts</h3>'
            "<p>Share of replies passing each of the console's style checks, with its Wilson "
            f"{confidence * 100:.0f}% CI ({legend}); <b>facts</b>: share of fact questions whose "
            "reply holds an expected fact.</p>"
            f'<div class="scroll"><table><thead><tr>{header}</tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table></div></section>")


ARENA_SOURCES = (("judge", "the judge's pairwise verdicts"), ("human", "human votes (blind A/B)"))


def _arena_rows(results: Mapping[str, Any]) -> list[tuple[str, str, list[list[str]]]]:
    """(source, what it is, rows) for each arena that has games: variant, Bradley–Terry
    rating [95% CI] (log-strength, mean 0), Elo-scaled, games, wins, ties."""
    arena = results.get("arena") or {}
    out = []
    for source, what in ARENA_SOURCES:
        table = arena.get(source) or {}
        if not table.get("games"):
            continue
        rows = []
        for r in table.get("ratings", []):
            ci = (f" [{r['low']:+.2f}, {r['high']:+.2f}]"
                  if r.get("low") is not None and r.get("high") is not None else "")
            rows.append([str(r["player"]), f"{r['rating']:+.2f}{ci}", f"{r['elo']:.0f}",
                         str(r["games"]), str(r["wins"]), str(r["ties"])])
        out.append((source, f"{what}: {table['games']} games", rows))
    return out


def _arena_agreement(results: Mapping[str, Any]) -> str | None:
    agree = (results.get("arena") or {}).get("agreement") or {}
    if not agree.get("pairs"):
        return None
    rho = agree.get("spearman")
    return (f"judge and humans order {agree['concordance']:.0%} of {agree['pairs']} variant "
            f"pairs alike (Spearman ρ {'—' if rho is None else f'{rho:.2f}'}, "
            f"{len(agree.get('players') or [])} variants both rated)")


ARENA_HEADER = ["variant", "rating [95% CI]", "Elo", "games", "wins", "ties"]


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


def _html_arena(results: Mapping[str, Any]) -> str:
    tables = _arena_rows(results)
    if not tables:
        return ""
    parts = ['<section id="arena"><h3>Arena</h3><p>Bradley–Terry ratings per variant '
             "(log-strength, mean 0; ties count half) with bootstrap 95% CIs.</p>"]
    header = "".join(f"<th>{_e(h)}</th>" for h in ARENA_HEADER)
    for _, title, rows in tables:
        body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>"
                       for row in rows)
        parts.append(f"<h4>{_e(title)}</h4><table><thead><tr>{header}</tr></thead>"
                     f"<tbody>{body}</tbody></table>")
    agreement = _arena_agreement(results)
    if agreement:
        parts.append(f"<p>{_e(agreement)}</p>")
    return "".join(parts) + "</section>"


def _html_questions(results: Mapping[str, Any]) -> str:
    labels = _labels(results)
    criteria = results.get("criteria", [])
    reference = _reference(results)
    combos = [c["id"] for c in results.get("combos", [])]
    questions = results.get("questions", [])
    counts: dict[str, int] = {}
    for q in questions:
        counts[q.get("set", "")] = counts.get(q.get("set", ""), 0) + 1
    sets = [s for s in results.get("sets", []) if s in counts] + \
        [s for s in counts if s not in results.get("sets", [])]
    filters = [f'<button type="button" data-filter="all" aria-pressed="true">all '
               f"({len(questions)})</button>"]
    filters += [f'<button type="button" data-filter="{_e(s)}" aria-pressed="false">'
                f"{_e(SET_TITLES.get(s, s))} ({counts[s]})</button>" for s in sets]
    controls = (
        '<div class="controls" role="toolbar" aria-label="question table">'
        f'<span class="group">show {"".join(filters)}</span>'
        '<span class="group">order '
        '<button type="button" data-sort="order" aria-pressed="true">as asked</button>'
        '<button type="button" data-sort="disagreement" aria-pressed="false">'
        "largest disagreement first</button></span>"
        f'<span id="q-count" class="sub">{len(questions)} questions</span></div>')
    rows = []
    for i, q in enumerate(questions):
        set_name = q.get("set", "")
        disagreement = q.get("disagreement")
        question = _e(q.get("question", ""))
        turns = _user_turns(q.get("transcript"))
        if set_name == "scripts" and turns:
            question = "<ol>" + "".join(f"<li>{_e(t)}</li>" for t in turns) + "</ol>"
        tags = f'<span class="tag set">{_e(SET_TITLES.get(set_name, set_name))}</span>' \
            f'<span class="qid">{_e(q.get("id", ""))}</span>'
        if q.get("question") == LAB_QUESTION:
            tags += '<span class="tag lab">lab question</span>'
        cells = [f'<th scope="row" class="question">{tags}'
                 f'<div class="qtext" lang="ja">{question}</div>'
                 f'<div class="sub">spread {_e(_num(disagreement))}</div></th>']
        cells += [_html_reply(q.get("replies", {}).get(c), criteria, c == reference)
                  for c in combos]
        rows.append(f'<tr data-set="{_e(set_name)}" data-index="{i}" '
                    f'data-disagreement="{float(disagreement or 0):.4f}">{"".join(cells)}</tr>')
    header = '<th class="question">question</th>' + "".join(
        f"<th>{_e(labels[c])}" + (' <span class="tag ref">reference</span>' if c == reference
                                  else "") + "</th>" for c in combos)
    return ('<section id="questions"><h2>Per question</h2>'
            "<p>Every combination's reply side by side, with its scores and its pairwise "
            "outcome against the reference. Spread: the largest difference between the "
            "combinations' mean scores on the question.</p>"
            f"{controls}"
            f'<div class="scroll"><table class="replies"><thead><tr>{header}</tr></thead>'
            f'<tbody id="q-rows">{"".join(rows)}</tbody></table></div></section>')


def _html_reply(reply: Mapping[str, Any] | None, criteria: Sequence[Mapping[str, Any]],
                is_reference: bool) -> str:
    if reply is None:
        return '<td class="reply"><span class="missing">— missing</span></td>'
    parts = []
    if reply.get("error"):
        parts.append(f'<div class="broken">missing — broken reply: {_e(reply["error"])}</div>')
        if reply.get("text"):
            parts.append(f'<div class="text partial" lang="ja">{_e(reply["text"])}</div>')
    else:
        text = reply.get("text", "")
        parts.append(f'<div class="text" lang="ja">{_e(text)}</div>' if text
                     else '<div class="missing">— empty reply</div>')
    scores = reply.get("scores") or {}
    chips = []
    for crit in criteria:
        score = scores.get(crit["name"])
        cls = "chip missing" if score is None else f"chip s{int(round(score))}"
        chips.append(f'<span class="{cls}" title="{_e(crit.get("title") or crit["name"])}">'
                     f'{_e(crit.get("title") or crit["name"])} <b>{_e(_score(score))}</b></span>')
    parts.append(f'<div class="chips">{"".join(chips)}</div>')
    pair = reply.get("pairwise") or {}
    if not is_reference and pair:
        outs = []
        for crit in criteria:
            if crit["name"] not in pair:
                continue
            outcome = pair[crit["name"]]
            cls = f"chip {outcome}" if outcome in OUTCOMES else "chip missing"
            outs.append(f'<span class="{cls}">{_e(crit.get("title") or crit["name"])} '
                        f"<b>{_e(outcome or MISSING)}</b></span>")
        parts.append(f'<div class="chips"><span class="sub">vs reference</span>{"".join(outs)}'
                     "</div>")
    extra = []
    if reply.get("stop") not in (None, "eos"):
        extra.append(f"stopped: {_e(reply['stop'])}")
    if reply.get("fact_hit") is not None:
        extra.append("fact: hit" if reply["fact_hit"] else "fact: miss")
    if extra:
        parts.append(f'<div class="sub">{" · ".join(extra)}</div>')
    return f'<td class="reply">{"".join(parts)}</td>'


# -- plots --------------------------------------------------------------------------------

# Local font names only (no web fonts): the browser draws the SVG's text with the first it has.
_FONTS = ["DejaVu Sans", "Noto Sans CJK JP", "Hiragino Sans", "Yu Gothic", "Meiryo",
          "IPAexGothic", "IPAGothic"]
_COLORS = {"win": "#2e7d32", "tie": "#9e9e9e", "loss": "#c62828"}


def render_plots(results: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """The four plots as (key, caption, inline <svg>): criterion means, pairwise outcomes,
    score distributions, style figures."""
    import matplotlib  # here, not at the top: importing the module stays cheap

    rc = {"svg.fonttype": "none", "svg.hashsalt": "kyara-report", "text.parse_math": False,
          "font.family": "sans-serif", "font.sans-serif": _FONTS, "font.size": 9,
          "axes.spines.top": False, "axes.spines.right": False, "axes.titlesize": 10}
    plots = [("means", "Criterion means with their confidence intervals, per combination "
              "(the reference's mean as a dashed line).", _plot_means),
             ("pairwise", "Pairwise verdicts against the reference: win, tie and loss shares "
              "with the confidence intervals of the win and loss rates.", _plot_pairwise),
             ("distributions", "Score distributions: the share of each score 1–7, per "
              "combination and criterion.", _plot_distributions),
             ("style", "Style figures and facts: the share of replies passing each check, with "
              "its confidence interval.", _plot_style)]
    out = []
    for key, caption, draw in plots:
        with matplotlib.rc_context(rc | {"svg.hashsalt": f"kyara-report-{key}"}), \
                warnings.catch_warnings():
            # Japanese glyphs are missing from matplotlib's own font: it only measures the
            # text; the browser draws it.
            warnings.filterwarnings("ignore", message=r"Glyph .* missing from")
            fig = draw(results)
            try:
                buf = io.StringIO()
                fig.savefig(buf, format="svg", metadata={"Date": None})
            finally:
                fig.clear()  # a bare Figure (no pyplot): nothing is registered to close
        out.append((key, caption, _inline_svg(buf.getvalue(), caption)))
    return out


def _inline_svg(svg: str, label: str) -> str:
    """matplotlib's SVG document as an element for the page: no XML prolog, DOCTYPE,
    metadata or namespace URIs (HTML needs none), scaled to the page's width."""
    svg = svg[svg.index("<svg"):]
    svg = re.sub(r"<metadata>.*?</metadata>\s*", "", svg, flags=re.S)
    head_end = svg.index(">")
    head = svg[:head_end]
    width = re.search(r'width="([\d.]+)pt"', head)
    head = re.sub(r'\s(?:xmlns(?::\w+)?|width|height|version)="[^"]*"', "", head)
    style = f"max-width:{float(width.group(1)) * 4 / 3:.0f}px" if width else ""
    head += f' role="img" aria-label="{_e(label)}" style="width:100%;{style}"'
    return head + svg[head_end:]


def _combo_colors(results: Mapping[str, Any]) -> dict[str, str]:
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
               "#7f7f7f", "#bcbd22", "#17becf"]
    reference = _reference(results)
    colors, i = {}, 0
    for combo in results.get("combos", []):
        if combo["id"] == reference:
            colors[combo["id"]] = "#404040"
        else:
            colors[combo["id"]] = palette[i % len(palette)]
            i += 1
    return colors


def _combo_label(results: Mapping[str, Any], combo: str) -> str:
    label = _labels(results).get(combo, combo)
    return label + " (ref)" if combo == _reference(results) else label


def _empty(fig, text: str):
    ax = fig.subplots()
    ax.axis("off")
    ax.text(0.5, 0.5, text, ha="center", va="center", color="#666666")
    return fig


def _plot_means(results: Mapping[str, Any]):
    from matplotlib.figure import Figure

    criteria = results.get("criteria", [])
    heads = results.get("headline", [])
    fig = Figure(figsize=(min(3.0 * max(len(criteria), 1) + 2.0, 11.0),
                          0.45 * max(len(heads), 1) + 1.2), layout="constrained")
    if not criteria or not heads:
        return _empty(fig, "no judge scores")
    colors = _combo_colors(results)
    axes = fig.subplots(1, len(criteria), sharey=True, squeeze=False)[0]
    ys = list(range(len(heads)))[::-1]
    for ax, crit in zip(axes, criteria, strict=True):
        for y, head in zip(ys, heads, strict=True):
            stat = head.get("criteria", {}).get(crit["name"]) or {}
            mean = stat.get("mean")
            if mean is None:
                ax.text(4, y, "missing", ha="center", va="center", color="#999999",
                        fontsize=8)
                continue
            lo = stat.get("lo") if stat.get("lo") is not None else mean
            hi = stat.get("hi") if stat.get("hi") is not None else mean
            ax.errorbar([mean], [y], xerr=[[mean - lo], [hi - mean]], fmt="o",
                        color=colors.get(head["combo"], "#1f77b4"), capsize=3, markersize=5)
            if head.get("reference"):
                ax.axvline(mean, color="#404040", linestyle="--", linewidth=0.8, alpha=0.6)
        ax.set_xlim(1, 7)
        ax.set_xticks(range(1, 8))
        ax.set_ylim(-0.6, len(heads) - 0.4)
        ax.grid(axis="x", color="#e0e0e0", linewidth=0.6)
        ax.set_axisbelow(True)
        ax.set_title(f"{crit.get('title') or crit['name']}\n{_calibration(crit)}", fontsize=9)
    axes[0].set_yticks(ys, [_combo_label(results, h["combo"]) for h in heads])
    return fig


def _plot_pairwise(results: Mapping[str, Any]):
    from matplotlib.figure import Figure

    criteria = results.get("criteria", [])
    heads = [h for h in results.get("headline", []) if not h.get("reference")]
    shown = [c for c in criteria if any((h.get("pairwise") or {}).get(c["name"]) for h in heads)]
    fig = Figure(figsize=(9.0, max(0.42 * len(heads) * len(shown) + 0.8 * len(shown) + 0.6,
                                   1.6)), layout="constrained")
    if not shown:
        return _empty(fig, "no pairwise verdicts")
    axes = fig.subplots(len(shown), 1, sharex=True, squeeze=False)[:, 0]
    ys = list(range(len(heads)))[::-1]
    for ax, crit in zip(axes, shown, strict=True):
        for y, head in zip(ys, heads, strict=True):
            pair = (head.get("pairwise") or {}).get(crit["name"])
            if not pair or not pair.get("n"):
                ax.text(0.5, y, "missing", ha="center", va="center", color="#999999")
                continue
            left = 0.0
            for outcome in OUTCOMES:
                rate = (pair.get(outcome) or {}).get("rate", 0.0) or 0.0
                ax.barh(y, rate, left=left, color=_COLORS[outcome], height=0.6,
                        label=outcome if y == ys[0] else None)
                if rate >= 0.08:
                    ax.text(left + rate / 2, y + 0.14, f"{rate * 100:.0f}%", ha="center",
                            va="center", color="white", fontsize=8, clip_on=True)
                left += rate
            # The intervals as whiskers across the win/tie and tie/loss borders.
            win, loss = pair.get("win"), pair.get("loss")
            if win and win.get("n"):
                ax.errorbar([win["rate"]], [y], xerr=[[win["rate"] - win["lo"]],
                                                      [win["hi"] - win["rate"]]],
                            fmt="none", ecolor="#1b1b1b", capsize=3, linewidth=1)
            if loss and loss.get("n"):
                ax.errorbar([1 - loss["rate"]], [y - 0.12],
                            xerr=[[loss["hi"] - loss["rate"]], [loss["rate"] - loss["lo"]]],
                            fmt="none", ecolor="#5a0000", capsize=3, linewidth=1)
            ax.text(1.01, y, f"n={pair['n']}", va="center", fontsize=8, color="#666666")
        ax.axvline(0.5, color="#404040", linewidth=0.6, linestyle=":")
        ax.set_xlim(0, 1)
        ax.set_ylim(-0.6, len(heads) - 0.2)
        ax.set_yticks(ys, [_combo_label(results, h["combo"]) for h in heads])
        ax.set_title(f"{crit.get('title') or crit['name']} — vs "
                     f"{_combo_label(results, _reference(results) or '')}", loc="left")
    axes[-1].set_xticks([0, 0.25, 0.5, 0.75, 1], ["0%", "25%", "50%", "75%", "100%"])
    axes[0].legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), ncols=3, frameon=False,
                   fontsize=8)
    return fig


def _plot_distributions(results: Mapping[str, Any]):
    from matplotlib.figure import Figure

    criteria = results.get("criteria", [])
    combos = [c["id"] for c in results.get("combos", [])]
    dists = results.get("distributions") or {}
    fig = Figure(figsize=(min(2.3 * max(len(criteria), 1) + 1.8, 11.0),
                          1.25 * max(len(combos), 1) + 0.6), layout="constrained")
    if not criteria or not combos:
        return _empty(fig, "no judge scores")
    colors = _combo_colors(results)
    axes = fig.subplots(len(combos), len(criteria), sharex=True, sharey=True, squeeze=False)
    scores = [str(s) for s in range(1, 8)]
    for r, combo in enumerate(combos):
        for c, crit in enumerate(criteria):
            ax = axes[r][c]
            counts = [int((dists.get(combo, {}).get(crit["name"]) or {}).get(s, 0) or 0)
                      for s in scores]
            total = sum(counts)
            if total:
                ax.bar(range(1, 8), [n / total for n in counts], color=colors.get(combo),
                       width=0.8)
                ax.text(0.98, 0.95, f"n={total}", transform=ax.transAxes, ha="right",
                        va="top", fontsize=7, color="#666666")
            else:
                ax.text(0.5, 0.5, "missing", transform=ax.transAxes, ha="center",
                        va="center", color="#999999", fontsize=8)
            ax.set_xticks(range(1, 8))
            ax.set_ylim(0, 1)
            ax.set_yticks([0, 0.5, 1], ["0", "50%", "100%"])
            ax.tick_params(labelsize=7)
            if r == 0:
                ax.set_title(crit.get("title") or crit["name"], fontsize=9)
            if c == 0:
                ax.set_ylabel(_combo_label(results, combo), fontsize=8, rotation=0,
                              ha="right", va="center")
    return fig


def _plot_style(results: Mapping[str, Any]):
    from matplotlib.figure import Figure

    heads = results.get("headline", [])
    checks = [(key, short) for key, short, _ in STYLE_CHECKS] + [("facts", "facts")]
    fig = Figure(figsize=(9.0, 0.25 * len(checks) * max(len(heads), 1) + 1.2),
                 layout="constrained")
    if not heads:
        return _empty(fig, "no replies")
    ax = fig.subplots()
    colors = _combo_colors(results)
    band = 0.8 / len(heads)
    for j, head in enumerate(heads):
        style = head.get("style") or {}
        for i, (key, _) in enumerate(checks):
            stat = head.get("facts") if key == "facts" else style.get(key)
            y = len(checks) - 1 - i + 0.4 - band * (j + 0.5)
            if not stat or not stat.get("n"):
                ax.text(0.01, y, "—", va="center", fontsize=7, color="#999999")
                continue
            ax.barh(y, stat["rate"], height=band * 0.85, color=colors.get(head["combo"]),
                    label=_combo_label(results, head["combo"]) if i == 0 else None,
                    xerr=[[stat["rate"] - stat["lo"]], [stat["hi"] - stat["rate"]]],
                    error_kw={"capsize": 2, "linewidth": 0.8, "ecolor": "#333333"})
    ax.set_yticks([len(checks) - 1 - i for i in range(len(checks))], [s for _, s in checks])
    ax.set_xlim(0, 1.0)
    ax.set_xticks([0, 0.25, 0.5, 0.75, 1], ["0%", "25%", "50%", "75%", "100%"])
    ax.grid(axis="x", color="#e0e0e0", linewidth=0.6)
    ax.set_axisbelow(True)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=8)
    return fig


_CSS = """
:root { --fg:#1d1d1f; --muted:#6b6b70; --line:#e2e2e6; --bg:#ffffff; --soft:#f5f5f7;
  --win:#2e7d32; --tie:#9e9e9e; --loss:#c62828; }
* { box-sizing: border-box; }
body { margin: 0; color: var(--fg); background: var(--bg); line-height: 1.5;
  font: 14px/1.5 system-ui, -apple-system, "Segoe UI", "Hiragino Sans", "Noto Sans CJK JP",
  "Yu Gothic", Meiryo, "IPAGothic", sans-serif; }
header, main { max-width: 1400px; margin: 0 auto; padding: 0 24px; }
header { padding-top: 20px; }
h1 { font-size: 22px; margin: 0 0 8px; }
h2 { font-size: 18px; margin: 28px 0 8px; border-bottom: 1px solid var(--line);
  padding-bottom: 4px; }
h3 { font-size: 15px; margin: 20px 0 6px; }
p { margin: 6px 0 10px; color: var(--muted); max-width: 110ch; }
dl.meta { display: grid; grid-template-columns: max-content 1fr; gap: 2px 16px; margin: 0;
  font-size: 13px; }
dl.meta dt { color: var(--muted); }
dl.meta dd { margin: 0; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border-bottom: 1px solid var(--line); padding: 5px 9px; text-align: left;
  vertical-align: top; }
thead th { background: var(--soft); font-weight: 600; position: sticky; top: 0; }
tr.group-start > * { border-top: 2px solid #c8c8cc; }
td.num { font-variant-numeric: tabular-nums; white-space: nowrap; }
td.up { color: var(--win); font-weight: 600; }
td.down { color: var(--loss); font-weight: 600; }
td.cal { color: var(--win); white-space: nowrap; }
td.uncal { color: #a15c00; white-space: nowrap; }
.muted { color: var(--muted); }
.warn { color: #a15c00; }
.sub { color: var(--muted); font-size: 12px; font-weight: normal; }
.tag { display: inline-block; font-size: 11px; padding: 0 6px; border-radius: 8px;
  background: var(--soft); border: 1px solid var(--line); margin-right: 4px;
  font-weight: normal; }
.tag.ref { background: #eceff1; }
.tag.lab { background: #fff3cd; border-color: #f0d58a; }
.qid { font-family: ui-monospace, monospace; font-size: 11px; color: var(--muted);
  margin-right: 4px; }
.wtl { display: flex; width: 220px; height: 10px; border-radius: 3px; overflow: hidden;
  background: var(--soft); margin: 3px 0; }
.seg.win { background: var(--win); } .seg.tie { background: var(--tie); }
.seg.loss { background: var(--loss); }
.win-text { color: var(--win); } .loss-text { color: var(--loss); }
.win-text, .tie-text, .loss-text { white-space: nowrap; }
figure { margin: 16px 0 24px; }
figure svg { display: block; height: auto; }
figcaption { color: var(--muted); font-size: 12px; margin-top: 4px; }
.controls { display: flex; flex-wrap: wrap; gap: 8px 20px; align-items: center;
  margin: 8px 0; }
.controls .group { display: inline-flex; gap: 4px; align-items: center;
  color: var(--muted); font-size: 13px; }
.controls button { font: inherit; font-size: 13px; padding: 2px 10px; border-radius: 12px;
  border: 1px solid var(--line); background: var(--bg); color: var(--fg); cursor: pointer; }
.controls button[aria-pressed="true"] { background: var(--fg); color: var(--bg);
  border-color: var(--fg); }
table.replies th.question { min-width: 220px; max-width: 300px; }
table.replies td.reply { min-width: 240px; max-width: 380px; }
.qtext { font-weight: 600; margin: 4px 0; }
.qtext ol { margin: 0; padding-left: 18px; font-weight: normal; }
.text { white-space: pre-wrap; overflow-wrap: anywhere; }
.text.partial { color: var(--muted); }
.broken, .missing { color: #a15c00; }
.chips { display: flex; flex-wrap: wrap; gap: 3px; margin-top: 5px; align-items: center; }
.chips .sub { margin-right: 2px; }
.chip { font-size: 11px; padding: 0 5px; border-radius: 4px; background: var(--soft);
  border: 1px solid var(--line); white-space: nowrap; }
.chip.s1, .chip.s2 { background: #fdecea; } .chip.s3 { background: #fff4e5; }
.chip.s5 { background: #eef7ee; } .chip.s6, .chip.s7 { background: #dcefdc; }
.chip.win { color: var(--win); border-color: #a5d6a7; }
.chip.loss { color: var(--loss); border-color: #ef9a9a; }
.chip.missing { color: #a15c00; border-style: dashed; }
tr[hidden] { display: none; }
"""

# The per-question table's filter and sort, no library. State lives in the address's
# fragment (#set=probes&sort=disagreement), so a view can be linked to and reloaded.
_SCRIPT = """
(function () {
  "use strict";
  var body = document.getElementById("q-rows");
  if (!body) { return; }
  var rows = Array.prototype.slice.call(body.querySelectorAll("tr[data-set]"));
  var sets = rows.map(function (r) { return r.getAttribute("data-set"); });
  var state = { set: "all", sort: "order" };
  function num(row, name) { return parseFloat(row.getAttribute(name)) || 0; }
  function apply() {
    var ordered = rows.slice().sort(function (a, b) {
      if (state.sort === "disagreement") {
        var d = num(b, "data-disagreement") - num(a, "data-disagreement");
        if (d !== 0) { return d; }
      }
      return num(a, "data-index") - num(b, "data-index");
    });
    var shown = 0;
    ordered.forEach(function (row) {
      var visible = state.set === "all" || row.getAttribute("data-set") === state.set;
      row.hidden = !visible;
      if (visible) { shown += 1; }
      body.appendChild(row);
    });
    document.querySelectorAll("[data-filter]").forEach(function (b) {
      b.setAttribute("aria-pressed", String(b.getAttribute("data-filter") === state.set));
    });
    document.querySelectorAll("[data-sort]").forEach(function (b) {
      b.setAttribute("aria-pressed", String(b.getAttribute("data-sort") === state.sort));
    });
    var count = document.getElementById("q-count");
    if (count) { count.textContent = shown + " of " + rows.length + " questions"; }
  }
  function readHash() {
    location.hash.replace(/^#/, "").split("&").forEach(function (part) {
      var kv = part.split("=");
      var value = decodeURIComponent(kv[1] || "");
      if (kv[0] === "set" && (value === "all" || sets.indexOf(value) >= 0)) { state.set = value; }
      if (kv[0] === "sort" && (value === "order" || value === "disagreement")) {
        state.sort = value;
      }
    });
  }
  function writeHash() {
    try {
      history.replaceState(null, "", "#set=" + encodeURIComponent(state.set) +
                           "&sort=" + state.sort);
    } catch (e) { /* a page opened from a file may refuse; the view still changes */ }
  }
  document.addEventListener("click", function (event) {
    var button = event.target.closest("[data-filter], [data-sort]");
    if (!button) { return; }
    if (button.hasAttribute("data-filter")) { state.set = button.getAttribute("data-filter"); }
    if (button.hasAttribute("data-sort")) { state.sort = button.getAttribute("data-sort"); }
    writeHash();
    apply();
  });
  window.addEventListener("hashchange", function () { readHash(); apply(); });
  readHash();
  apply();
})();
"""
