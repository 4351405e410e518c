"""`kyara report [RUN]`: an evaluation run's headline table, read from the results.json the
eval job writes into `<home>/evals/<name>/` beside report.html and report.md; without RUN,
the runs found, newest first.

Only JSON is read here: the console never imports the statistics (scipy) or the HTML report
(matplotlib). The reading, the checking and the layout live in this module and are shared
with the Reports screen (console/reports_screen.py); every figure is printed by
pipelines.evaluation.formatting, the functions report.md and report.html print it with, so
an interval reads the same in all three (imported where a figure is first printed: the CLI's
start does not pay for pipelines.evaluation, which reading results.json loads anyway). Everything in results.json is
untrusted text (variant names, labels): it is shown as Text, never parsed as markup.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console, ConsoleOptions, Group, RenderResult
from rich.table import Table
from rich.text import Text

from console.common import ConfigsOption, err, fail, out, user_errors
from pipelines.home import EvalFiles, Home

RESULTS = EvalFiles.RESULTS
DASH = "—"
STYLE_KEYS = ("ends", "register", "one_sentence", "stop", "newlines")
STYLE_HEADERS = ("ends", "register", "1-sent", "stop", "newlines")
STYLE_NOTE = ("style: share of replies that pass each check (ends: the persona's sentence "
              "end; register: her endings; 1-sent: one sentence; stop: ended by EOS; "
              "newlines: no line break); chars: median length; facts: fact questions "
              "answered with an expected fact")
SCORE_NOTE = ("scores: each criterion's mean [{ci} CI] over questions; Δ vs the reference "
              "[CI], Wilcoxon p; pairwise win/tie/loss vs the reference (W/T/L)")
CRITERION_WIDTH = 20  # "-1.80 [-2.30, -1.30]", the widest line of a criterion's cell


class RunError(Exception):
    """A run that cannot be shown; the message is the one line the user sees."""


# --- finding and reading runs ------------------------------------------------------------


def evals_dir(home: Path) -> Path:
    return Home(home).evals


@dataclass(frozen=True)
class EvalRun:
    """One folder under <home>/evals with a results.json, as the listing shows it."""

    name: str
    path: Path  # its results.json
    created: datetime | None  # meta.created, else the file's modification time
    combos: int | None
    error: str | None = None  # results.json unreadable: the one line that says why

    @property
    def folder(self) -> Path:
        return self.path.parent

    def when(self) -> str:
        return self.created.astimezone().strftime("%Y-%m-%d %H:%M") if self.created else DASH


def _parse_time(value: Any) -> datetime | None:
    if isinstance(value, str):
        try:
            when = datetime.fromisoformat(value.replace("Z", "+00:00"))
            return when if when.tzinfo else when.astimezone()  # naive: local time
        except ValueError:
            pass
    return None


def _created(value: Any, path: Path) -> datetime | None:
    try:
        return _parse_time(value) or datetime.fromtimestamp(path.stat().st_mtime).astimezone()
    except OSError:  # removed since it was listed
        return None


def list_runs(home: Path) -> list[EvalRun]:
    """Every <home>/evals/*/results.json, newest first; an unreadable one is listed with
    its error rather than left out."""
    runs = []
    for path in evals_dir(home).glob(f"*/{RESULTS}"):
        try:
            data = load_results(path)
        except RunError as exc:
            runs.append(EvalRun(path.parent.name, path, _created(None, path), None, str(exc)))
            continue
        meta = data["meta"]
        runs.append(EvalRun(str(meta.get("name") or path.parent.name), path,
                            _created(meta.get("created"), path), len(data["headline"])))
    return sorted(runs, key=lambda r: r.created.timestamp() if r.created else 0.0, reverse=True)


def resolve_run(run: str, home: Path | None) -> Path:
    """RUN as the user typed it: a folder holding results.json, a results.json, or an eval
    name under <home>/evals. Returns the results.json path."""
    given = Path(run).expanduser()
    if given.is_file():
        return given
    if given.is_dir():
        if (given / RESULTS).is_file():
            return given / RESULTS
        raise RunError(f"{given}: no {RESULTS} (the eval job writes it when it finishes)")
    if home is not None and "/" not in run and run not in (".", ".."):
        named = evals_dir(home) / run
        if (named / RESULTS).is_file():
            return named / RESULTS
        if named.is_dir():
            raise RunError(f"eval run {run}: no {RESULTS} yet in {named} (the eval job "
                           "writes it when it finishes)")
    where = f" nor a run under {evals_dir(home)}" if home is not None else ""
    raise RunError(f"no eval run {run!r}: not a folder, not a {RESULTS}{where} "
                   "(kyara report lists them)")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def load_results(path: Path) -> dict[str, Any]:
    """results.json parsed and its outline checked (pipelines.evaluation.results, which
    imports no model library); RunError (one line) otherwise."""
    from pipelines.evaluation.results import load_results as read

    try:
        data = read(path)
    except ValueError as exc:
        raise RunError(str(exc)) from None
    for key in ("combos", "criteria", "headline"):
        if not isinstance(data.get(key), list):
            raise RunError(f"{path}: not an eval results file ({key!r} is not a list)")
    if not isinstance(data.get("meta"), dict):
        raise RunError(f"{path}: not an eval results file ('meta' is not an object)")
    return data


# --- the report, checked and formatted ---------------------------------------------------


def _num(value: Any, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RunError(f"{where}: expected a number or null, found {json.dumps(value)[:40]}")
    return None if math.isnan(value) else float(value)


def _obj(value: Any, where: str) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise RunError(f"{where}: expected an object or null, found {json.dumps(value)[:40]}")
    return value


@dataclass
class Rate:
    rate: float
    k: int | None = None
    n: int | None = None


def _rate(value: Any, where: str) -> Rate | None:
    found = _obj(value, where)
    if found is None:
        return None
    rate = _num(found.get("rate"), f"{where}.rate")
    if rate is None:
        return None
    k, n = found.get("k"), found.get("n")
    return Rate(rate, k if isinstance(k, int) else None, n if isinstance(n, int) else None)


@dataclass
class Cell:
    """One criterion of one combination."""

    mean: float | None
    lo: float | None
    hi: float | None
    n: int
    missing: int
    diff: dict[str, float | None] | None  # mean, lo, hi, p; None for the reference
    diff_n: int | None
    wtl: tuple[float, float, float] | None  # win, tie, loss shares; None when not judged
    pair_n: int | None

    @property
    def mean_text(self) -> str:
        """"5.12 [4.80, 5.41]", "5.12 [—]" without an interval, "—" without a mean."""
        from pipelines.evaluation.formatting import fmt_mean

        return fmt_mean({"mean": self.mean, "lo": self.lo, "hi": self.hi})

    @property
    def diff_text(self) -> str:
        """"+0.62 [+0.21, +1.05]": the difference to the reference, every bound signed."""
        from pipelines.evaluation.formatting import fmt_diff

        return fmt_diff(self.diff)

    @property
    def delta_text(self) -> str:
        """The difference alone, "+0.62" (the chart's line; its interval is in the table)."""
        from pipelines.evaluation.formatting import fmt_num

        return fmt_num(self.diff["mean"] if self.diff else None, signed=True)

    @property
    def p_text(self) -> str:
        from pipelines.evaluation.formatting import fmt_p

        # a cell has no p column: a missing p still says what is missing
        return fmt_p(self.diff["p"], missing=f"p={DASH}") if self.diff is not None else ""

    @property
    def wtl_text(self) -> str:
        from pipelines.evaluation.formatting import fmt_share

        if self.wtl is None:
            return f"W/T/L {DASH}"
        win, tie, loss = (fmt_share(x) for x in self.wtl)
        return f"W{win} T{tie} L{loss}"


@dataclass
class Row:
    combo: str
    label: str
    reference: bool
    questions: int | None
    cells: dict[str, Cell]
    style: dict[str, Rate | None]
    median_chars: float | None
    facts: Rate | None


@dataclass
class Criterion:
    name: str
    title: str
    calibration: str


@dataclass
class Report:
    """results.json as the console shows it: every figure checked, None where missing."""

    path: Path
    name: str
    persona: str
    judge: str
    created: str
    confidence: float
    samples: int | None
    criteria: list[Criterion]
    rows: list[Row]
    scale: tuple[int, int] = (1, 7)
    sets: list[str] = field(default_factory=list)

    @property
    def folder(self) -> Path:
        return self.path.parent

    @property
    def reference(self) -> Row | None:
        return next((r for r in self.rows if r.reference), None)

    def ci_text(self) -> str:
        return f"{self.confidence * 100:.0f}%"


def _cell(found: Any, pair: Any, reference: bool, where: str) -> Cell:
    crit = _obj(found, where) or {}
    diff = _obj(crit.get("diff"), f"{where}.diff")
    shown_diff = None if diff is None else {
        key: _num(diff.get(key), f"{where}.diff.{key}") for key in ("mean", "lo", "hi", "p")}
    pair = _obj(pair, f"{where} pairwise")
    wtl = None
    if pair:
        shares = [_rate(pair.get(k), f"{where} pairwise.{k}") for k in ("win", "tie", "loss")]
        if all(s is not None for s in shares):
            wtl = tuple(s.rate for s in shares)  # type: ignore[union-attr]
    if reference:
        shown_diff = None
    n = crit.get("n")
    missing = crit.get("missing")
    return Cell(mean=_num(crit.get("mean"), f"{where}.mean"),
                lo=_num(crit.get("lo"), f"{where}.lo"), hi=_num(crit.get("hi"), f"{where}.hi"),
                n=n if isinstance(n, int) else 0,
                missing=missing if isinstance(missing, int) else 0,
                diff=shown_diff, diff_n=diff.get("n") if diff else None,
                wtl=wtl, pair_n=pair.get("n") if pair else None)


def _scale(data: dict[str, Any]) -> tuple[int, int]:
    """The score axis: the keys of the score distributions (1..7 when there are none)."""
    keys: set[int] = set()
    for per_combo in (data.get("distributions") or {}).values():
        for counts in (per_combo or {}).values() if isinstance(per_combo, dict) else ():
            if isinstance(counts, dict):
                keys |= {int(k) for k in counts if str(k).lstrip("-").isdigit()}
    if len(keys) >= 2:
        return min(keys), max(keys)
    return 1, 7


def build_report(data: dict[str, Any], path: Path) -> Report:
    """Check every figure the console shows; RunError names the first bad one."""
    try:
        return _build_report(data, Path(path))
    except RunError as exc:
        raise RunError(f"{path}: {exc}") from None
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise RunError(f"{path}: unexpected content ({_one_line(exc)})") from None


def _build_report(data: dict[str, Any], path: Path) -> Report:
    meta = data["meta"]
    criteria: list[Criterion] = []
    for i, found in enumerate(data["criteria"]):
        c = _obj(found, f"criteria[{i}]") or {}
        name = str(c.get("name") or f"criterion {i + 1}")
        criteria.append(Criterion(name, str(c.get("title") or name),
                                  str(c.get("calibration") or "calibration unknown")))
    rows = []
    for i, found in enumerate(data["headline"]):
        h = _obj(found, f"headline[{i}]")
        if h is None:
            raise RunError(f"headline[{i}] is null")
        combo = str(h.get("combo") or f"combo {i + 1}")
        reference = h.get("reference") is True or combo == meta.get("reference")
        crits = _obj(h.get("criteria"), f"headline[{i}].criteria") or {}
        pairs = _obj(h.get("pairwise"), f"headline[{i}].pairwise") or {}
        for name in crits:  # a criterion scored but not listed still shows
            if all(c.name != name for c in criteria):
                criteria.append(Criterion(str(name), str(name), "calibration unknown"))
        where = f"headline[{i}]"
        cells = {c.name: _cell(crits.get(c.name), pairs.get(c.name), reference,
                               f"{where}.criteria.{c.name}") for c in criteria}
        style = _obj(h.get("style"), f"{where}.style") or {}
        questions = h.get("questions")
        rows.append(Row(combo=combo, label=str(h.get("label") or combo), reference=reference,
                        questions=questions if isinstance(questions, int) else None,
                        cells=cells,
                        style={k: _rate(style.get(k), f"{where}.style.{k}") for k in STYLE_KEYS},
                        median_chars=_num(style.get("median_chars"),
                                          f"{where}.style.median_chars"),
                        facts=_rate(h.get("facts"), f"{where}.facts")))
    for row in rows:  # criteria found late: the earlier rows show them as missing
        for c in criteria:
            row.cells.setdefault(c.name, _cell(None, None, row.reference, c.name))
    judge = meta.get("judge")
    judge_text = (str(judge.get("model") or judge.get("name") or DASH)
                  if isinstance(judge, dict) else str(judge or DASH))
    confidence = _num(meta.get("confidence"), "meta.confidence") or 0.95
    samples = meta.get("samples")
    sets = data.get("sets")
    return Report(path=path, name=str(meta.get("name") or path.parent.name),
                  persona=str(meta.get("persona") or DASH), judge=judge_text,
                  created=str(meta.get("created") or DASH), confidence=confidence,
                  samples=samples if isinstance(samples, int) else None,
                  criteria=criteria, rows=rows, scale=_scale(data),
                  sets=[str(s) for s in sets] if isinstance(sets, list) else [])


def read_report(path: Path) -> Report:
    """load_results then build_report: the one call the CLI and the screen make."""
    return build_report(load_results(path), path)


# --- rich renderables --------------------------------------------------------------------


def combo_text(row: Row) -> Text:
    text = Text(row.label, style="bold" if row.reference else "")
    if row.reference:
        text.append("\n(reference)", style="cyan")
    return text


def criterion_header(c: Criterion) -> Text:
    uncalibrated = c.calibration.startswith("uncalibrated")
    return Text.assemble((c.title, "bold"), "\n",
                         (c.calibration, "yellow" if uncalibrated else "dim"))


def cell_text(cell: Cell, reference: bool) -> Text:
    """Four lines: the mean, Δ vs the reference, its p (and missing questions), W/T/L."""
    text = Text(cell.mean_text, style="dim" if cell.mean is None else "")
    if reference:
        text.append("\nreference", style="cyan")
        if cell.missing:
            text.append(f"\n{cell.missing} missing", style="yellow")
        return text
    colour = ""
    if cell.diff is not None and cell.diff["p"] is not None and cell.diff["p"] < 0.05:
        colour = "green" if (cell.diff["mean"] or 0) > 0 else "red"
    text.append("\n" + cell.diff_text, style=colour)
    text.append("\n" + cell.p_text)
    if cell.missing:
        text.append(f" {cell.missing} missing", style="yellow")
    text.append("\n" + cell.wtl_text)
    return text


class HeadlineTables:
    """The scores table (one row per combination), split into several when the criteria
    do not fit the width, then the style and facts table and the notes."""

    def __init__(self, report: Report) -> None:
        self.report = report

    def score_tables(self, width: int) -> list[Table]:
        r = self.report
        per = max(1, (width - 14) // (CRITERION_WIDTH + 2))
        chunks = [r.criteria[i:i + per] for i in range(0, len(r.criteria), per)] or [[]]
        tables = []
        for chunk in chunks:
            # a blank line under every row: the four-line cells stay apart
            table = Table(box=None, pad_edge=False, show_edge=False, header_style="",
                          padding=(0, 1, 1, 1))
            table.add_column(Text("combination", style="bold"), ratio=1, min_width=12,
                             overflow="fold")
            for c in chunk:
                table.add_column(criterion_header(c), width=CRITERION_WIDTH, overflow="fold")
            for row in r.rows:
                table.add_row(combo_text(row),
                              *(cell_text(row.cells[c.name], row.reference) for c in chunk))
            tables.append(table)
        return tables

    def style_table(self) -> Table:
        from pipelines.evaluation.formatting import fmt_num, fmt_share

        table = Table(box=None, pad_edge=False, show_edge=False, header_style="bold")
        table.add_column("combination", ratio=1, min_width=12, overflow="fold")
        for header in (*STYLE_HEADERS, "chars"):
            table.add_column(header, justify="right", no_wrap=True)
        table.add_column("facts", justify="right")
        for row in self.report.rows:
            facts = fmt_share(row.facts.rate if row.facts else None)
            if row.facts is not None and row.facts.n is not None:
                facts += f" {row.facts.k}/{row.facts.n}"
            label = Text(row.label + (" (ref)" if row.reference else ""),
                         style="bold" if row.reference else "")
            table.add_row(label,
                          *(fmt_share(s.rate if s else None) for s in row.style.values()),
                          fmt_num(row.median_chars, digits=0),
                          facts)
        return table

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        r = self.report
        for i, table in enumerate(self.score_tables(options.max_width)):
            if i:
                yield Text("")
            yield table
        yield Text(SCORE_NOTE.format(ci=r.ci_text()), style="dim")
        yield Text("")
        yield Text("style and facts", style="bold")
        yield self.style_table()
        yield Text(STYLE_NOTE, style="dim")


def meta_text(report: Report) -> Text:
    samples = f", {report.samples} sample(s)" if report.samples is not None else ""
    when = _parse_time(report.created)
    created = when.astimezone().strftime("%Y-%m-%d %H:%M") if when else report.created
    sets = f", sets {', '.join(report.sets)}" if report.sets else ""
    ref = report.reference.label if report.reference else DASH
    return Text.assemble((report.name, "bold"),
                         f"  persona {report.persona}, judge {report.judge}, "
                         f"{created}{samples}{sets}; reference {ref}")


def paths_text(report: Report) -> Text:
    text = Text()
    for name in (EvalFiles.REPORT_HTML, EvalFiles.REPORT_MD):
        path = report.folder / name
        text.append(f"{name:<12}", style="bold")
        text.append(str(path))
        if not path.exists():
            text.append("  (not written yet)", style="yellow")
        text.append("\n")
    text.rstrip()
    return text


def headline(report: Report) -> Group:
    """What `kyara report RUN` prints before the paths of the reports."""
    return Group(meta_text(report), Text(""), HeadlineTables(report), Text(""))


def runs_table(runs: list[EvalRun]) -> Table:
    table = Table(box=None, pad_edge=False, show_edge=False, header_style="bold")
    table.add_column("name", overflow="fold")
    table.add_column("date", no_wrap=True)
    table.add_column("combos", justify="right", no_wrap=True)
    table.add_column("path", overflow="fold", ratio=1)
    for run in runs:
        combos = (Text("corrupt", style="red") if run.error else
                  Text(DASH if run.combos is None else str(run.combos)))
        table.add_row(Text(run.name), run.when(), combos, Text(str(run.folder)))
    return table


# --- the command -------------------------------------------------------------------------


def _home(configs: Optional[Path]) -> Path:
    from pipelines.workspace import Workspace

    try:
        return Workspace.load(configs).settings.home_path()
    except user_errors() as exc:
        fail(str(exc))


def report(
    run: Optional[str] = typer.Argument(
        None, help="an eval run: its name, its folder or its results.json; none: list them"),
    configs: Optional[Path] = ConfigsOption,
) -> None:
    """An evaluation run's headline table: each criterion's mean and CI, the difference to
    the reference, pairwise win/tie/loss, style and facts; then where its reports are.
    Without RUN: the eval runs found, newest first. Exit 2 for a missing or corrupt run."""
    if run is None:
        home = _home(configs)
        runs = list_runs(home)
        if not runs:
            out.print(Text(f"no eval runs under {evals_dir(home)} "
                           "(kyara jobs run configs/jobs/<eval job>.yaml)"))
            return
        out.print(runs_table(runs))
        for bad in runs:
            if bad.error:
                err.print(Text(f"kyara: {bad.error}"), soft_wrap=True)
        return
    given = Path(run).expanduser()
    home = None if given.exists() else _home(configs)
    try:
        shown = read_report(resolve_run(run, home))
    except RunError as exc:
        fail(str(exc))
    out.print(headline(shown))
    out.print(paths_text(shown), soft_wrap=True)  # whole, to copy or click
