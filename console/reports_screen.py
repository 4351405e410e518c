"""The Reports screen: the evaluation runs under <home>/evals (newest first); Enter opens
one: its headline table (console/report_cli.py's, the one `kyara report RUN` prints), then
for each criterion a bar per combination up to its mean on the score axis with a ├──┼──┤
whisker over its confidence interval, and the pairwise win/tie/loss against the reference.

Every file is read by a thread worker that posts a Message back (../shared/STYLE.md,
harlequin): the screen opens at once and a large results.json never holds up a key. A run
that cannot be read is one line in the screen; the app stays up. Text from results.json
(labels, names) is shown as Text, never parsed as markup."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.cells import cell_len
from rich.console import Console, ConsoleOptions, Group, RenderResult
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Footer, OptionList, Static
from textual.widgets.option_list import Option
from textual.worker import Worker, WorkerState

from console.report_cli import (
    Cell,
    Criterion,
    EvalRun,
    HeadlineTables,
    Report,
    RunError,
    evals_dir,
    list_runs,
    meta_text,
    paths_text,
    read_report,
)

LABEL_MAX = 24  # a combination's label in the charts; longer ones end in "…"
WIN, TIE, LOSS = "█", "▒", "░"


@dataclass
class RunsListed(Message):
    runs: list[EvalRun]


@dataclass
class ReportRead(Message):
    report: Report


@dataclass
class ReportFailed(Message):
    reason: str  # one line


def _label(text: str, width: int, style: str = "") -> Text:
    shown = Text(text, style=style)
    shown.truncate(width, overflow="ellipsis", pad=True)
    return shown


class CriterionChart:
    """One criterion: per combination a line of figures and a bar on the score axis, the
    axis, then the pairwise shares. Laid out for the width it is given at render time."""

    def __init__(self, report: Report, criterion: Criterion) -> None:
        self.report = report
        self.criterion = criterion

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        width = max(30, options.max_width)
        rows = self.report.rows
        label_w = min(LABEL_MAX, max((cell_len(r.label) for r in rows), default=8))
        axis_w = width - 2
        name = self.criterion.name
        c = self.criterion
        yield Text.assemble((c.title, "bold underline"), "  ",
                            (c.calibration, "yellow" if c.calibration.startswith("uncal")
                             else "dim"))
        for row in rows:
            cell = row.cells[name]
            line = Text("  ")
            line.append_text(_label(row.label, label_w, "bold" if row.reference else ""))
            line.append("  ")
            line.append(cell.mean_text)
            if row.reference:
                line.append("  reference", style="cyan")
            elif cell.diff is not None and cell.diff["mean"] is not None:
                # the interval of the difference is in the headline table above
                line.append(f"  Δ {cell.delta_text} {cell.p_text}")
            if cell.missing:
                line.append(f"  {cell.missing} missing", style="yellow")
            yield line
            yield Text("  ").append_text(self.bar(cell, axis_w, row.reference))
        yield Text("  ").append_text(self.axis(axis_w))
        others = [r for r in rows if not r.reference]
        if not others:
            return
        ref = self.report.reference
        yield Text.assemble(("  pairwise vs ", "dim"), (ref.label if ref else "the reference",
                                                         "dim"),
                            (f": win {WIN} tie {TIE} loss {LOSS}", "dim"))
        stack_w = max(10, width - 2 - label_w - 2 - 2 - 22)
        for row in others:
            cell = row.cells[name]
            line = Text("  ")
            line.append_text(_label(row.label, label_w))
            line.append("  ")
            if cell.wtl is None:
                line.append("— not judged pairwise", style="dim")
            else:
                line.append_text(self.stack(cell.wtl, stack_w))
                line.append(f"  {cell.wtl_text}")
                if cell.pair_n is not None:
                    line.append(f" n={cell.pair_n}", style="dim")
            yield line

    def position(self, value: float, width: int) -> int:
        low, high = self.report.scale
        share = (value - low) / (high - low) if high > low else 0.0
        return min(width - 1, max(0, round(share * (width - 1))))

    def bar(self, cell: Cell, width: int, reference: bool) -> Text:
        """█ from the axis start up to the mean; ├──┼──┤ from lo to hi (┼ at the mean)."""
        if cell.mean is None:
            return Text("missing", style="yellow")
        colour = "cyan" if reference else "blue"
        mean = self.position(cell.mean, width)
        chars = ["█"] * (mean + 1) + [" "] * (width - mean - 1)
        whisker: set[int] = set()
        if cell.lo is not None and cell.hi is not None:
            lo, hi = self.position(cell.lo, width), self.position(cell.hi, width)
            if lo == hi:
                chars[lo] = "│"
                whisker.add(lo)
            else:
                for i in range(lo, hi + 1):
                    chars[i] = "├" if i == lo else "┤" if i == hi else "─"
                    whisker.add(i)
                if lo < mean < hi:
                    chars[mean] = "┼"
        text = Text()
        for i, char in enumerate(chars):
            if i in whisker:
                text.append(char, style=f"bold white on {colour}" if i <= mean else "bold")
            else:
                text.append(char, style=colour if i <= mean else "")
        text.rstrip()
        return text

    def axis(self, width: int) -> Text:
        low, high = self.report.scale
        chars = [" "] * width
        for value in range(low, high + 1):
            mark = str(value)
            at = min(self.position(value, width), width - len(mark))
            chars[at:at + len(mark)] = mark
        return Text("".join(chars).rstrip(), style="dim")

    @staticmethod
    def stack(shares: tuple[float, float, float], width: int) -> Text:
        win = round(shares[0] * width)
        tie = min(width - win, round(shares[1] * width))
        loss = max(0, width - win - tie)
        return Text.assemble((WIN * win, "green"), (TIE * tie, "yellow"), (LOSS * loss, "red"))


def describe_run(run: EvalRun) -> Text:
    """A run in the list: date, name, combinations; its folder on the next line."""
    text = Text.assemble((f"{run.when()}  ", "dim"), (run.name, "bold"))
    if run.error:
        text.append("  corrupt results.json", style="red")
    else:
        text.append(f"  {run.combos} combinations", style="")
    text.append(f"\n{run.folder}", style="dim")
    return text


class ReportsScreen(Screen[None]):
    """The eval runs, newest first; Enter opens one, `a` the arena, Escape goes back."""

    BINDINGS = [Binding("a", "arena", "Arena", id="reports_arena")]
    DEFAULT_CSS = """
    #reports-title { height: auto; max-height: 3; background: $panel; padding: 0 1; }
    #reports { height: 1fr; }
    """

    def __init__(self, home: Path, store: Any = None) -> None:
        super().__init__()
        self.home = Path(home)
        self.store = store  # the arena's human votes; None: no arena
        self.runs: list[EvalRun] = []
        self.loaded = False

    def compose(self) -> ComposeResult:
        yield Static(Text("reports: reading the eval runs… (Escape back)"),
                     id="reports-title", markup=False)
        yield OptionList(id="reports")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#reports", OptionList).focus()
        self.read_runs()

    @work(thread=True, exclusive=True, exit_on_error=False, group="reports",
          description="read the eval runs")
    def read_runs(self) -> None:
        self.post_message(RunsListed(list_runs(self.home)))

    def on_runs_listed(self, message: RunsListed) -> None:
        self.runs = message.runs
        self.loaded = True
        title = self.query_one("#reports-title", Static)
        options = self.query_one("#reports", OptionList)
        options.clear_options()
        if not self.runs:
            title.update(Text(f"reports: no eval runs under {evals_dir(self.home)} yet: run "
                              "an eval job (ctrl+j, n). Escape back"))
            return
        title.update(Text(f"reports: {len(self.runs)} eval runs, newest first "
                          "(Enter opens, a: arena, Escape back)"))
        options.add_options([Option(describe_run(run), id=str(run.path)) for run in self.runs])
        options.highlighted = 0

    @on(Worker.StateChanged)
    def read_failed(self, event: Worker.StateChanged) -> None:
        if event.state == WorkerState.ERROR:
            self.loaded = True
            self.query_one("#reports-title", Static).update(
                Text(f"reports: could not read {evals_dir(self.home)}: {event.worker.error}",
                     style="red"))

    @on(OptionList.OptionSelected, "#reports")
    def chosen(self, event: OptionList.OptionSelected) -> None:
        self.app.push_screen(ReportScreen(Path(str(event.option.id))))

    def action_arena(self) -> None:
        from console.arena_screen import ArenaScreen

        if self.store is None:
            self.notify("the arena needs the store", severity="warning", markup=False)
            return
        self.app.push_screen(ArenaScreen(self.store, self.home))

    def action_cancel(self) -> None:
        self.app.pop_screen()


class ReportScreen(Screen[None]):
    """One run: meta, where its reports are, the headline table, a chart per criterion."""

    BINDINGS = [Binding("c", "next_chart", "Next chart", id="report_next_chart")]
    DEFAULT_CSS = """
    #report-title { height: 1; background: $panel; padding: 0 1; }
    #report-body { height: 1fr; padding: 0 1; }
    #report-body > Static { height: auto; margin-bottom: 1; }
    #report-error { color: $error; }
    """

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = Path(path)
        self.report: Report | None = None
        self.error: str | None = None
        self._chart = -1  # the chart `c` went to last

    def compose(self) -> ComposeResult:
        yield Static(Text(f"report: reading {self.path}…"), id="report-title", markup=False)
        yield VerticalScroll(id="report-body")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#report-body", VerticalScroll).focus()
        self.read()

    @work(thread=True, exclusive=True, exit_on_error=False, group="report",
          description="read the eval results")
    def read(self) -> None:
        try:
            report = read_report(self.path)
        except RunError as exc:
            self.post_message(ReportFailed(str(exc)))
            return
        self.post_message(ReportRead(report))

    def on_report_read(self, message: ReportRead) -> None:
        report = self.report = message.report
        self.query_one("#report-title", Static).update(
            Text(f"report {report.name}  (c: next chart, Escape: back)"))
        body = self.query_one("#report-body", VerticalScroll)
        body.remove_children()
        body.mount(Static(Group(meta_text(report), paths_text(report)), id="report-meta"),
                   Static(HeadlineTables(report), id="report-headline"),
                   *(Static(CriterionChart(report, c), classes="chart")
                     for c in report.criteria))

    def on_report_failed(self, message: ReportFailed) -> None:
        self.show_error(message.reason)

    @on(Worker.StateChanged)
    def read_failed(self, event: Worker.StateChanged) -> None:
        """Anything RunError did not name (a bug): still one line, the app stays up."""
        if event.state == WorkerState.ERROR:
            self.show_error(f"{self.path}: {type(event.worker.error).__name__}: "
                            f"{' '.join(str(event.worker.error).split())}")

    def show_error(self, reason: str) -> None:
        self.error = reason
        self.query_one("#report-title", Static).update(
            Text("report: could not be read (Escape back)", style="red"))
        body = self.query_one("#report-body", VerticalScroll)
        body.remove_children()
        body.mount(Static(Text(reason), id="report-error", markup=False))

    def action_next_chart(self) -> None:
        charts = list(self.query(".chart"))
        if not charts:
            return
        self._chart = (self._chart + 1) % len(charts)
        self.query_one("#report-body", VerticalScroll).scroll_to_widget(
            charts[self._chart], animate=False, top=True)

    def action_cancel(self) -> None:
        self.app.pop_screen()
