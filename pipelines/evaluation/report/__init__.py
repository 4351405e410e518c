"""The eval run's report: results.json (built by `pipelines.evaluation.results`) written as
`report.md` and a self-contained `report.html`, for people to read.

    write_report(results, folder) -> (report.md, report.html)   both written atomically
    markdown(results) -> str                                     the report.md text
    html_page(results) -> str                                    the report.html text
    render_plots(results) -> [(key, caption, <svg>)]             the page's four plots

One module a part: `markdown.py`, `page.py` (the HTML; its CSS and script in `assets.py`),
`plots.py` (matplotlib), `common.py` (what the two files share); every figure is printed by
`pipelines.evaluation.formatting`, the console's formatting too.

The page carries everything it shows: inline CSS, inline <svg> plots (matplotlib, text kept
as text so the browser's fonts draw the Japanese), one inline script for the per-question
table's filter and sort, and no URL of any kind, so it reads the same copied off the server.
Every text from results (replies are model output, reasons are anyone's) is escaped, and a
missing value (a failed verdict, a broken reply) is shown as "—", never as 0.

matplotlib is imported inside the plotting functions only: importing this package stays
cheap (the console lists reports without drawing them).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipelines.evaluation.formatting import (
    MISSING,
    OUTCOMES,
    fmt_date,
    fmt_diff,
    fmt_mean,
    fmt_p,
    fmt_pairwise,
    fmt_rate,
)
from pipelines.evaluation.report.common import LAB_QUESTION, SET_TITLES, STYLE_CHECKS
from pipelines.evaluation.report.markdown import markdown
from pipelines.evaluation.report.page import html_page
from pipelines.evaluation.report.plots import render_plots
from pipelines.files import write_atomic
from pipelines.home import EvalFiles

__all__ = ["LAB_QUESTION", "MISSING", "OUTCOMES", "SET_TITLES", "STYLE_CHECKS", "fmt_date",
           "fmt_diff", "fmt_mean", "fmt_p", "fmt_pairwise", "fmt_rate", "html_page",
           "markdown", "render_plots", "write_report"]


def write_report(results: Mapping[str, Any], folder: Path) -> tuple[Path, Path]:
    """Write `report.md` and `report.html` for `results` into `folder` (made if missing).
    Each file is written to a temporary name beside it and renamed over the old one, so a
    reader never sees half a report."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    md_text = markdown(results)
    html_text = html_page(results)
    md_path, html_path = folder / EvalFiles.REPORT_MD, folder / EvalFiles.REPORT_HTML
    write_atomic(md_path, md_text)
    write_atomic(html_path, html_text)
    return md_path, html_path
