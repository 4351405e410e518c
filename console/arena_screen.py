"""The Arena screen (`a` on the Reports screen): Bradley–Terry ratings per variant with
95% bootstrap intervals from the human votes (blind A/B) and from the judge's pairwise
verdicts (eval runs), and how far the two agree: what `kyara arena` prints
(console/arena_cli.py renders both).

The ratings are fitted by a thread worker that posts a Message back (../shared/STYLE.md):
the bootstrap takes a moment on many games and must not hold up a key. A failure is one line
in the screen and the app stays up. Variant names are shown as Text, never parsed as markup."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Footer, Static
from textual.worker import Worker, WorkerState

from console.arena_cli import boards, renderables


@dataclass
class ArenaRead(Message):
    shown: list[Any]
    warnings: list[Text]


class ArenaScreen(Screen[None]):
    """Both arenas and their agreement; `r` fits them again (after new votes)."""

    BINDINGS = [Binding("r", "refresh", "Refresh", id="arena_refresh")]
    DEFAULT_CSS = """
    #arena-title { height: 1; background: $panel; padding: 0 1; }
    #arena-body { height: 1fr; padding: 0 1; }
    #arena-body > Static { height: auto; margin-bottom: 1; }
    """

    def __init__(self, store: Any, home: Path, samples: int = 1000) -> None:
        super().__init__()
        self.store = store
        self.home = Path(home)
        self.samples = samples
        self.shown: list[Any] = []
        self.error: str | None = None

    def compose(self) -> ComposeResult:
        yield Static(Text("arena: fitting the ratings…"), id="arena-title", markup=False)
        yield VerticalScroll(id="arena-body")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#arena-body", VerticalScroll).focus()
        self.fit()

    @work(thread=True, exclusive=True, exit_on_error=False, group="arena",
          description="fit the arena's ratings")
    def fit(self) -> None:
        made = boards(self.store, self.home, ["human", "judge"], samples=self.samples)
        self.post_message(ArenaRead(*renderables(made)))

    def on_arena_read(self, message: ArenaRead) -> None:
        self.shown, self.error = message.shown, None
        self.query_one("#arena-title", Static).update(
            Text("arena: human votes and the judge's pairwise verdicts (r: refresh, "
                 "Escape: back)"))
        body = self.query_one("#arena-body", VerticalScroll)
        body.remove_children()
        body.mount(*(Static(item, markup=False) for item in message.shown),
                   *(Static(Text(w.plain, style="yellow"), markup=False)
                     for w in message.warnings))

    @on(Worker.StateChanged)
    def fit_failed(self, event: Worker.StateChanged) -> None:
        if event.state == WorkerState.ERROR:
            error = event.worker.error
            self.error = f"{type(error).__name__}: {' '.join(str(error).split())}"
            self.query_one("#arena-title", Static).update(
                Text(f"arena: could not be fitted: {self.error}"[:300], style="red"))

    def action_refresh(self) -> None:
        self.query_one("#arena-title", Static).update(Text("arena: fitting the ratings…"))
        self.fit()

    def action_cancel(self) -> None:
        self.app.pop_screen()
