"""The jobs screen: runs (newest first), live progress, a loss / score sparkline and the log
tail of the selected run; start a job from configs/jobs/*.yaml; cancel with SIGTERM to its
process group. Jobs are detached processes (console/jobs.py): quitting the console or losing
the SSH connection does not stop them, and this screen re-attaches by reading their events
from the start."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import Footer, OptionList, ProgressBar, Sparkline, Static
from textual.widgets.option_list import Option

POLL_S = 0.5
LOG_LINES = 12


class RunView:
    """What the screen knows of one run, built incrementally from its events."""

    def __init__(self) -> None:
        self.offset = 0
        self.lines: list[str] = []
        self.progress: tuple[float, float | None] = (0.0, None)
        self.metrics: dict[str, list[float]] = {}
        self.finished = False

    def feed(self, events: list[Any]) -> None:
        from console.jobs import describe

        for event in events:
            self.lines.append(describe(event))
            if event.type == "progress":
                self.progress = (event.current or 0.0, event.total)
            elif event.type == "metric" and event.value is not None:
                self.metrics.setdefault(event.name, []).append(float(event.value))
            elif event.type in ("done", "error"):
                self.finished = True
        del self.lines[:-200]

    def chart(self) -> tuple[str, list[float]]:
        """The series worth a sparkline: loss first, then a score (an evolve run's best-so-far
        curve before its per-evaluation fitness), then the longest."""
        for name in ("loss", "train_loss", "score", "best_fitness", "fitness", "eval_loss"):
            if len(self.metrics.get(name, [])) > 1:
                return name, self.metrics[name]
        longest = max(self.metrics.items(), key=lambda kv: len(kv[1]), default=("", []))
        return longest


class JobsScreen(Screen[None]):
    BINDINGS = [
        Binding("n", "new_job", "New job", id="jobs_new"),
        Binding("c", "cancel_job", "Cancel job", id="jobs_cancel"),
    ]
    DEFAULT_CSS = """
    #jobs-title { height: 1; background: $panel; padding: 0 1; }
    #jobs-body { height: 1fr; }
    #runs { width: 40%; }
    #run-detail { width: 1fr; padding: 0 1; }
    #run-head { height: auto; }
    #run-progress { height: 1; }
    #run-chart { height: 3; }
    #run-log { height: 1fr; }
    #job-picker { height: auto; max-height: 12; border: round $accent; }
    """

    def __init__(self, workspace: Any, store: Any, on_finished: Any = None) -> None:
        super().__init__()
        self.workspace = workspace
        self.store = store
        self.on_finished = on_finished  # called once per run that finishes while watched
        self.runs: list[Any] = []
        self.views: dict[str, RunView] = {}
        self.selected_id: str | None = None
        self._announced: set[str] = set()

    def compose(self) -> ComposeResult:
        yield Static(Text("jobs  (n: new job, c: cancel, Escape: back)"), id="jobs-title",
                     markup=False)
        with Horizontal(id="jobs-body"):
            yield OptionList(id="runs")
            with Vertical(id="run-detail"):
                yield Static("", id="run-head", markup=False)
                yield ProgressBar(id="run-progress", show_eta=False)
                yield Sparkline([], id="run-chart")
                yield Static("", id="run-log", markup=False)
        yield Footer()

    def on_mount(self) -> None:
        from console.jobs import reconcile

        reconcile(self.store)  # runs that died while nobody watched become "lost"
        self.refresh_runs()
        self.set_interval(POLL_S, self.poll)
        self.query_one("#runs", OptionList).focus()

    # --- data ---------------------------------------------------------------------------

    def refresh_runs(self) -> None:
        from console.jobs import list_runs

        self.runs = list_runs(self.store, limit=50)
        runs = self.query_one("#runs", OptionList)
        highlighted = runs.highlighted
        runs.clear_options()
        for run in self.runs:
            colour = {"done": "green", "error": "red", "lost": "red", "cancelled": "yellow",
                      "running": "cyan", "starting": "cyan"}.get(run.status, "")
            runs.add_option(Option(Text.assemble((f"{run.status:<9}", colour),
                                                 (f"{run.kind:<7}", "dim"), run.name),
                                   id=run.id))
        if self.runs:
            runs.highlighted = min(highlighted or 0, len(self.runs) - 1)
            if self.selected_id is None:
                self.selected_id = self.runs[0].id

    def poll(self) -> None:
        """Tail the selected run; refresh the list while anything is live."""
        from console.jobs import tail

        live = changed = False
        for run in self.runs:
            if run.run_dir is None:
                continue
            view = self.views.setdefault(run.id, RunView())
            if run.id != self.selected_id and view.finished:
                continue
            events, view.offset = tail(run.run_dir, view.offset)
            view.feed(events)
            live = live or not view.finished
            if view.finished and run.id not in self._announced:
                self._announced.add(run.id)
                changed = True
                if events and self.on_finished is not None:
                    self.on_finished(run)  # e.g. a new variant to offer at once
        if live or changed:
            self.refresh_runs()
        self.show_selected()

    def show_selected(self) -> None:
        run = next((r for r in self.runs if r.id == self.selected_id), None)
        head = self.query_one("#run-head", Static)
        if run is None:
            head.update(Text("no runs yet: press n to start a job", style="dim"))
            return
        view = self.views.get(run.id) or RunView()
        head.update(Text.assemble((f"{run.name} ", "bold"), (f"[{run.status}] ", ""),
                                  (str(run.run_dir or ""), "dim")))
        current, total = view.progress
        bar = self.query_one("#run-progress", ProgressBar)
        bar.update(total=total, progress=current)
        name, series = view.chart()
        self.query_one("#run-chart", Sparkline).data = series[-60:] or [0.0]
        log = Text(f"{name}: {series[-1]:.4g}\n" if series else "", style="bold")
        log.append("\n".join(view.lines[-LOG_LINES:]))
        self.query_one("#run-log", Static).update(log)

    @on(OptionList.OptionHighlighted, "#runs")
    def run_highlighted(self, event: OptionList.OptionHighlighted) -> None:
        self.selected_id = str(event.option.id)
        self.show_selected()

    # --- actions ------------------------------------------------------------------------

    def job_files(self) -> dict[str, Path]:
        """The job files that load; each bad one is named in a notification, left out."""
        jobs, problems = self.workspace.jobs()
        for line in problems:
            self.notify(f"left out: {line}", severity="warning", markup=False, timeout=10)
        return jobs

    def action_new_job(self) -> None:
        if self.query("#job-picker"):
            return
        picker = OptionList(*[Option(Text(name), id=name) for name in self.job_files()],
                            id="job-picker")
        self.mount(picker, before=self.query_one("#jobs-body"))
        picker.focus()

    @on(OptionList.OptionSelected, "#job-picker")
    def job_chosen(self, event: OptionList.OptionSelected) -> None:
        event.option_list.remove()
        path = self.workspace.job_files().get(str(event.option.id))
        if path is not None:
            self.start_job(path)  # a file broken since the list was shown: launch says so

    def start_job(self, path: Path) -> None:
        from console.jobs import LaunchError, launch
        from pipelines.config import ConfigError

        try:
            run = launch(path, self.workspace, store=self.store)
        except (LaunchError, ConfigError) as exc:
            self.notify(str(exc), severity="error", markup=False)
            return
        self.selected_id = run.id
        self.refresh_runs()
        self.notify(f"started {run.name} (detached: it keeps running if you quit)",
                    markup=False)
        self.query_one("#runs", OptionList).focus()

    def action_cancel_job(self) -> None:
        from console.jobs import cancel

        run = next((r for r in self.runs if r.id == self.selected_id), None)
        if run is None:
            return
        if cancel(run):
            self.notify(f"sent SIGTERM to {run.name}", markup=False)
        else:
            self.notify(f"{run.name} is not running", severity="warning", markup=False)

    def action_cancel(self) -> None:
        """Escape: close the job picker, else go back to the chat."""
        picker = self.query("#job-picker")
        if picker:
            picker.first().remove()
            self.query_one("#runs", OptionList).focus()
            return
        self.app.pop_screen()
