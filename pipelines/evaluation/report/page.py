"""report.html: one self-contained page (inline CSS, inline SVG plots, one inline script for
the per-question table's filter and sort, no URL of any kind); every text from results
escaped."""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from typing import Any

from pipelines.evaluation.formatting import (
    MISSING,
    OUTCOMES,
    fmt_diff,
    fmt_mean,
    fmt_num,
    fmt_p,
    fmt_rate,
)
from pipelines.evaluation.report.assets import CSS, SCRIPT
from pipelines.evaluation.report.common import (
    ARENA_HEADER,
    LAB_QUESTION,
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
from pipelines.evaluation.report.plots import render_plots


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
        f"<style>{CSS}</style>",
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
        f"<script>{SCRIPT}</script>",
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
        cells += [f'<td class="num">{_e(fmt_num(style.get("median_chars"), 0))}</td>',
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
                 f'<div class="sub">spread {_e(fmt_num(disagreement))}</div></th>']
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
