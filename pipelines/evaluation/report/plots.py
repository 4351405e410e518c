"""The report's four plots as inline <svg> (matplotlib, text kept as text so the browser's
fonts draw the Japanese): criterion means, pairwise outcomes, score distributions, style
figures. matplotlib is imported inside the functions only: importing the report stays
cheap."""

from __future__ import annotations

import html
import io
import re
import warnings
from collections.abc import Mapping
from typing import Any

from pipelines.evaluation.formatting import OUTCOMES
from pipelines.evaluation.report.common import STYLE_CHECKS, _calibration, _labels, _reference

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
    head += f' role="img" aria-label="{html.escape(label, quote=True)}" style="width:100%;{style}"'
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
