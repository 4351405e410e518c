"""History: past chat sessions and comparisons, newest first; Enter reopens one. The store
is read by a thread worker that posts the rows back: the screen opens at once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Footer, OptionList, Static
from textual.widgets.option_list import Option
from textual.worker import Worker, WorkerState


@dataclass
class SessionsRead(Message):
    rows: list[dict[str, Any]]


def session_rows(store: Any, persona: str | None = None) -> list[dict[str, Any]]:
    from store.sql import quote

    # an eval job's replies are stored as sessions too; its report is where to read them
    where = "kind != 'eval'" + (f" AND persona = {quote(persona)}" if persona else "")
    rows = store.rows("sessions", where=where)
    return sorted(rows, key=lambda r: r["updated_at"], reverse=True)


def describe(row: dict[str, Any]) -> Text:
    when = row["updated_at"].astimezone().strftime("%m-%d %H:%M")
    kind = "比較" if row["kind"] == "compare" else "chat"
    return Text.assemble((f"{when} ", "dim"), (f"{kind:<5}", "cyan"),
                         (f"{row.get('variant') or '':<18.18} ", "dim"),
                         (row.get("title") or "(無題)", ""))


class HistoryScreen(Screen[dict[str, Any] | None]):
    """Dismisses with the chosen session row (or None on Escape)."""

    DEFAULT_CSS = """
    #history-title { height: 1; background: $panel; padding: 0 1; }
    #history { height: 1fr; }
    """

    def __init__(self, store: Any, persona: str) -> None:
        super().__init__()
        self.store = store
        self.persona = persona
        self.rows: list[dict[str, Any]] = []
        self.loaded = False

    def compose(self) -> ComposeResult:
        yield Static(Text("history: reading the sessions… (Escape back)"),
                     id="history-title", markup=False)
        yield OptionList(id="history")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#history", OptionList).focus()
        self.read_sessions()

    @work(thread=True, exclusive=True, exit_on_error=False, group="history",
          description="read the history")
    def read_sessions(self) -> None:
        self.post_message(SessionsRead(session_rows(self.store, self.persona)))

    def on_sessions_read(self, message: SessionsRead) -> None:
        self.rows = message.rows
        self.loaded = True
        self.query_one("#history-title", Static).update(
            Text(f"history: {len(self.rows)} sessions (Enter opens, Escape back)"))
        history = self.query_one("#history", OptionList)
        history.add_options([Option(describe(r), id=r["id"]) for r in self.rows])
        if self.rows:
            history.highlighted = 0

    @on(Worker.StateChanged)
    def read_failed(self, event: Worker.StateChanged) -> None:
        if event.state == WorkerState.ERROR:
            self.query_one("#history-title", Static).update(
                Text(f"history: could not read the store: {event.worker.error}", style="red"))

    @on(OptionList.OptionSelected, "#history")
    def chosen(self, event: OptionList.OptionSelected) -> None:
        row = next(r for r in self.rows if r["id"] == event.option.id)
        self.dismiss(row)

    def action_cancel(self) -> None:
        self.dismiss(None)
