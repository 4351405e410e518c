"""The jobs screen: runs (newest first), live progress, a loss / score sparkline and the log
tail of the selected run; start a job from configs/jobs/*.yaml; cancel with SIGTERM to its
process group. Jobs are detached processes (console/jobs.py): quitting the console or losing
the SSH connection does not stop them, and this screen re-attaches by reading their events
from the start.

Everything that reads or writes outside the process — the store (LanceDB), `/proc`, the
runs' events.jsonl, starting and signalling a job — runs in a thread worker that posts a
Message back; widgets are touched only in the handlers, on the event loop, so a slow disk or
store never holds up a key press (../shared/STYLE.md, harlequin)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Footer, OptionList, ProgressBar, Sparkline, Static
from textual.widgets.option_list import Option
from textual.worker import Worker, WorkerState

POLL_S = 0.5
LOG_ENTRIES = 40  # events shown in the log pane (a multi-line one counts once)
KEEP_ENTRIES = 200  # events kept per run
MESSAGE_LINES = 60  # lines of one multi-line log message shown before "… N more lines"
CHART_FIRST = ("loss", "train_loss", "score", "best_fitness", "fitness", "eval_loss")


def screen_text(event: Any) -> str:
    """One event as the log pane shows it: plain text, control characters visible. A log
    message of several lines (the data-preparation table) keeps its lines as written; every
    other event is the one line `kyara jobs show` prints."""
    from console.jobs import describe, visible

    message = (event.message or "") if event.type == "log" else ""
    lines = message.strip("\n").split("\n")
    if len(lines) < 2:
        return describe(event)
    clock = datetime.fromtimestamp(event.ts).strftime("%H:%M:%S")
    shown = [f"{clock} {event.level} {visible(lines[0].rstrip())}"]
    shown += [visible(line.rstrip().expandtabs()) for line in lines[1:MESSAGE_LINES + 1]]
    if len(lines) > MESSAGE_LINES + 1:
        shown.append(f"… {len(lines) - MESSAGE_LINES - 1} more lines")
    return "\n".join(shown)


@dataclass
class RunEvents:
    """What a poll read of one run: its new events, their text, where to read next."""

    events: list[Any]
    texts: list[str]
    offset: int


@dataclass
class RunsPolled(Message):
    """A poll's result: the run list when it was read, and the runs' new events."""

    runs: list[Any] | None
    read: dict[str, RunEvents] = field(default_factory=dict)


@dataclass
class JobStarted(Message):
    run: Any


@dataclass
class JobNotStarted(Message):
    reason: str


@dataclass
class CancelSent(Message):
    name: str
    sent: bool


class RunView:
    """What the screen knows of one run, built incrementally from its events."""

    def __init__(self) -> None:
        self.offset = 0
        self.lines: list[str] = []  # one entry per event; a multi-line log message is one
        self.progress: tuple[float, float | None] = (0.0, None)
        self.metrics: dict[str, list[float]] = {}
        self.finished = False
        self.version = 0  # bumped by every feed: the screen redraws only what changed

    def feed(self, events: list[Any], texts: list[str] | None = None) -> None:
        if texts is None:
            texts = [screen_text(event) for event in events]
        self.lines.extend(texts)
        for event in events:
            if event.type == "progress":
                self.progress = (event.current or 0.0, event.total)
            elif event.type == "metric" and event.value is not None:
                self.metrics.setdefault(event.name, []).append(float(event.value))
            elif event.type in ("done", "error"):
                self.finished = True
        del self.lines[:-KEEP_ENTRIES]
        if events or texts:
            self.version += 1

    def chart(self) -> tuple[str, list[float]]:
        """The series worth a sparkline — one with more than one point: loss first, then a
        score (an evolve run's best-so-far curve before its per-evaluation fitness), then
        the longest. ("", []) when every metric has a single value (those are text)."""
        for name in CHART_FIRST:
            if len(self.metrics.get(name, [])) > 1:
                return name, self.metrics[name]
        name, series = max(self.metrics.items(), key=lambda kv: len(kv[1]), default=("", []))
        return (name, series) if len(series) > 1 else ("", [])

    def figures(self) -> Text:
        """The latest value of every metric, as text: the charted series first."""
        charted, _ = self.chart()
        text = Text()
        for name in sorted(self.metrics, key=lambda n: n != charted):
            if text:
                text.append("  ")
            text.append(f"{name}: ", style="bold" if name == charted else "")
            text.append(f"{self.metrics[name][-1]:.4g}")
        return text


def _status_colour(status: str) -> str:
    return {"done": "green", "error": "red", "lost": "red", "cancelled": "yellow",
            "running": "cyan", "starting": "cyan"}.get(status, "")


class JobsScreen(Screen[None]):
    BINDINGS = [
        Binding("n", "new_job", "New job", id="jobs_new"),
        Binding("c", "cancel_job", "Cancel job", id="jobs_cancel"),
        Binding("r", "reports", "Reports", id="jobs_reports"),
    ]
    DEFAULT_CSS = """
    #jobs-title { height: 1; background: $panel; padding: 0 1; }
    #jobs-body { height: 1fr; }
    #runs { width: 40%; }
    #run-detail { width: 1fr; padding: 0 1; }
    #run-head { height: auto; }
    #run-progress { height: 1; }
    #run-figures { height: auto; }
    #run-chart { height: 3; }
    #run-log-scroll { height: 1fr; }
    #run-log { height: auto; }
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
        self._polling = False  # a poll is in flight: the next waits for its message
        self._first_poll = True  # reconcile and list before anything else
        self._list_wanted = False  # read the run list at the next poll (a job was started)
        self._shown_runs: list[tuple[str, str, str, str]] | None = None
        self._shown_detail: Any = ()  # what the detail pane shows; () before the first
        self._poll_error: str | None = None

    def compose(self) -> ComposeResult:
        yield Static(Text("jobs  (n: new job, c: cancel, r: reports, Escape: back)"),
                     id="jobs-title", markup=False)
        with Horizontal(id="jobs-body"):
            yield OptionList(id="runs")
            with Vertical(id="run-detail"):
                yield Static(Text("reading the runs…", style="dim"), id="run-head",
                             markup=False)
                yield ProgressBar(id="run-progress", show_eta=False)
                yield Static("", id="run-figures", markup=False)
                yield Sparkline([], id="run-chart")
                yield VerticalScroll(Static("", id="run-log", markup=False),
                                     id="run-log-scroll")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#run-chart", Sparkline).display = False
        self.poll()
        self.set_interval(POLL_S, self.poll)
        self.query_one("#runs", OptionList).focus()

    # --- reading (thread workers) and showing (on the loop) ------------------------------

    def poll(self) -> None:
        """Every POLL_S: tail the selected run and every live one, off the event loop; one
        poll at a time (the next starts once this one's message is handled)."""
        if self._polling:
            return
        self._polling = True
        state = {run_id: (view.offset, view.finished) for run_id, view in self.views.items()}
        first, self._first_poll = self._first_poll, False
        wanted, self._list_wanted = self._list_wanted, False
        self.read_runs(list(self.runs), state, self.selected_id, frozenset(self._announced),
                       first=first, list_first=first or wanted)

    @work(thread=True, exclusive=True, exit_on_error=False, group="jobs-poll",
          description="read the jobs")
    def read_runs(self, runs: list[Any], state: dict[str, tuple[int, bool]],
                  selected_id: str | None, announced: frozenset[str], *, first: bool,
                  list_first: bool) -> None:
        from console.jobs import list_runs, reconcile, tail

        listed = None
        if first:
            reconcile(self.store)  # runs that died while nobody watched become "lost"
        if list_first:
            runs = listed = list_runs(self.store, limit=50)
            if selected_id is None and runs:
                selected_id = runs[0].id
        read: dict[str, RunEvents] = {}
        live = changed = False
        for run in runs:
            if run.run_dir is None:
                continue
            offset, finished = state.get(run.id, (0, False))
            if run.id != selected_id and finished:
                continue
            events, offset = tail(run.run_dir, offset)
            texts = [screen_text(event) for event in events[-KEEP_ENTRIES:]]
            read[run.id] = RunEvents(events, texts, offset)
            finished = finished or any(event.terminal for event in events)
            live = live or not finished
            changed = changed or (finished and run.id not in announced)
        if live or changed:  # a status may have moved on since the list was read
            listed = list_runs(self.store, limit=50)
        self.post_message(RunsPolled(listed, read))

    def on_runs_polled(self, message: RunsPolled) -> None:
        self._polling = False
        self._poll_error = None
        if message.runs is not None:
            self.show_runs(message.runs)
        by_id = {run.id: run for run in self.runs}
        for run_id, read in message.read.items():
            view = self.views.setdefault(run_id, RunView())
            view.offset = read.offset
            view.feed(read.events, read.texts)
            if view.finished and run_id not in self._announced:
                self._announced.add(run_id)
                run = by_id.get(run_id)
                if read.events and run is not None and self.on_finished is not None:
                    self.on_finished(run)  # e.g. a new variant to offer at once
        self.show_selected()

    @on(Worker.StateChanged)
    def worker_ended(self, event: Worker.StateChanged) -> None:
        """A failed read, start or cancel is a notification (once per reason); the screen
        stays and the next poll tries again."""
        worker = event.worker
        if event.state not in (WorkerState.ERROR, WorkerState.CANCELLED):
            return
        if worker.group == "jobs-poll":
            self._polling = False
            if event.state == WorkerState.ERROR and str(worker.error) != self._poll_error:
                self._poll_error = str(worker.error)
                self.notify(f"{worker.description}: {worker.error}", severity="error",
                            markup=False, timeout=8)
        elif event.state == WorkerState.ERROR:
            self.notify(f"{worker.description}: {worker.error}", severity="error",
                        markup=False, timeout=8)

    def show_runs(self, runs: list[Any]) -> None:
        """The run list; rebuilt only when a run, a status or a name changed."""
        self.runs = runs
        if self.selected_id is None and runs:
            self.selected_id = runs[0].id
        shown = [(run.id, run.status, run.kind, run.name) for run in runs]
        if shown == self._shown_runs:
            return
        self._shown_runs = shown
        options = self.query_one("#runs", OptionList)
        highlighted = options.highlighted
        options.clear_options()
        for run in runs:
            options.add_option(Option(Text.assemble((f"{run.status:<9}", _status_colour(run.status)),
                                                    (f"{run.kind:<7}", "dim"), run.name),
                                      id=run.id))
        if runs:
            ids = [run.id for run in runs]
            options.highlighted = (ids.index(self.selected_id) if self.selected_id in ids
                                   else min(highlighted or 0, len(runs) - 1))

    def show_selected(self) -> None:
        run = next((r for r in self.runs if r.id == self.selected_id), None)
        view = self.views.get(run.id) if run is not None else None
        shown = (None if run is None else
                 (run.id, run.status, run.name, str(run.run_dir),
                  view.version if view is not None else -1))
        if shown == self._shown_detail:
            return
        other_run = not self._shown_detail or shown is None or self._shown_detail[0] != shown[0]
        self._shown_detail = shown
        head = self.query_one("#run-head", Static)
        chart = self.query_one("#run-chart", Sparkline)
        figures = self.query_one("#run-figures", Static)
        log = self.query_one("#run-log", Static)
        if run is None:
            head.update(Text("no runs yet: press n to start a job", style="dim"))
            figures.update("")
            chart.display = False
            log.update("")
            return
        view = view or RunView()
        head.update(Text.assemble((f"{run.name} ", "bold"), (f"[{run.status}] ", ""),
                                  (str(run.run_dir or ""), "dim")))
        current, total = view.progress
        self.query_one("#run-progress", ProgressBar).update(total=total, progress=current)
        figures.update(view.figures())
        _, series = view.chart()
        chart.display = bool(series)  # a single value is text above, never a solid block
        if series:
            chart.data = series[-60:]
        scroll = self.query_one("#run-log-scroll", VerticalScroll)
        at_end = scroll.scroll_y >= scroll.max_scroll_y  # keep reading where the user is
        log.update(Text("\n".join(view.lines[-LOG_ENTRIES:])))
        if at_end or other_run:
            scroll.call_after_refresh(scroll.scroll_end, animate=False)

    @on(OptionList.OptionHighlighted, "#runs")
    def run_highlighted(self, event: OptionList.OptionHighlighted) -> None:
        self.selected_id = str(event.option.id)
        self.show_selected()
        if self.selected_id not in self.views:
            self.poll()  # a run not read yet: its story at once, not in 0.5 s

    # --- actions ------------------------------------------------------------------------

    def job_files(self) -> dict[str, Path]:
        """The job files that load; each bad one is named in a notification, left out."""
        from pipelines.jobs import offered_jobs

        jobs, problems = offered_jobs(self.workspace)
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
        self.launch_job(path)

    @work(thread=True, exit_on_error=False, group="jobs-launch", description="start a job")
    def launch_job(self, path: Path) -> None:
        from console.jobs import LaunchError, launch
        from pipelines.config import ConfigError

        try:
            run = launch(path, self.workspace, store=self.store)
        except (LaunchError, ConfigError) as exc:
            self.post_message(JobNotStarted(str(exc)))
            return
        self.post_message(JobStarted(run))

    def on_job_started(self, message: JobStarted) -> None:
        run = message.run
        self.selected_id = run.id
        self.show_runs([run] + [r for r in self.runs if r.id != run.id])
        self._list_wanted = True
        self.show_selected()
        self.notify(f"started {run.name} (detached: it keeps running if you quit)",
                    markup=False)
        self.query_one("#runs", OptionList).focus()

    def on_job_not_started(self, message: JobNotStarted) -> None:
        self.notify(message.reason, severity="error", markup=False)

    def action_cancel_job(self) -> None:
        run = next((r for r in self.runs if r.id == self.selected_id), None)
        if run is not None:
            self.send_cancel(run)

    @work(thread=True, exit_on_error=False, group="jobs-cancel", description="cancel a job")
    def send_cancel(self, run: Any) -> None:
        from console.jobs import cancel

        self.post_message(CancelSent(run.name, cancel(run)))

    def on_cancel_sent(self, message: CancelSent) -> None:
        if message.sent:
            self.notify(f"sent SIGTERM to {message.name}", markup=False)
        else:
            self.notify(f"{message.name} is not running", severity="warning", markup=False)

    def action_reports(self) -> None:
        """The eval runs' reports (an eval job writes them under <home>/evals)."""
        from console.reports_screen import ReportsScreen

        self.app.push_screen(ReportsScreen(self.workspace.settings.home_path(), self.store))

    def action_cancel(self) -> None:
        """Escape: close the job picker, else go back to the chat."""
        picker = self.query("#job-picker")
        if picker:
            picker.first().remove()
            self.query_one("#runs", OptionList).focus()
            return
        self.app.pop_screen()
