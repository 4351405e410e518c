"""Compare: one question sent to 2–4 variant / retrieval combinations, side by side, each
streamed (one after another: they share the device) and judged; stored as a `compare`
session that the history screen reopens."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Footer, Input, Static
from textual.worker import get_current_worker

from console.widgets import Badges, ReplyText, plain

FLUSH_S = 0.03


@dataclass
class ColumnChunk(Message):
    round: int
    index: int
    text: str


@dataclass
class ColumnDone(Message):
    round: int
    index: int
    message: dict[str, Any] | None
    final: Any


class Column(Vertical):
    DEFAULT_CSS = """
    Column { width: 1fr; height: auto; border: round $primary; padding: 0 1; }
    Column > .head { text-style: bold; color: $accent; }
    Column > .reason { color: $error; display: none; }
    Column > .reason.shown { display: block; }
    """

    def __init__(self, label: str, speaker: str, criteria: list[str]) -> None:
        super().__init__()
        self.label = label
        self.reply = ReplyText(speaker)
        self.badges = Badges(criteria)
        self.reason = Static("", classes="reason", markup=False)
        self.message: dict[str, Any] | None = None

    def compose(self) -> ComposeResult:
        yield Static(Text(self.label), classes="head", markup=False)
        yield self.reply
        yield self.reason
        yield self.badges

    def set_label(self, label: str) -> None:
        """The column's heading (a blind comparison reveals the names here)."""
        self.label = label
        self.query_one(".head", Static).update(Text(label))

    def show_error(self, reason: str | None) -> None:
        """Why this combination has no reply (the stored row's one-line `error`: a model
        file that is not there, a worker that crashed), in the pane itself."""
        self.reason.update(plain(reason or "generation failed"))
        self.reason.add_class("shown")


class CompareScreen(Screen[None]):
    # Escape reaches action_cancel through the app's priority binding.
    DEFAULT_CSS = """
    #compare-status { height: 1; background: $panel; padding: 0 1; }
    #rounds { height: 1fr; }
    .question { margin: 1 0 0 0; background: $boost; padding: 0 1; }
    #compare-prompt { height: 3; }
    """

    def __init__(self, session: Any, combos: list[Any], *, judge: Any = None) -> None:
        super().__init__()
        # a ChatSession of kind "compare"; its pool (the console's) holds the backends
        self.session = session
        self.combos = combos
        self.judge = judge
        self.rounds: list[list[Column]] = []
        self.busy = False

    def compose(self) -> ComposeResult:
        labels = " | ".join(c.label for c in self.combos)
        yield Static(Text(f"compare: {labels}"), id="compare-status", markup=False)
        yield VerticalScroll(id="rounds")
        yield Input(placeholder="比較する質問を入力 (Enter)", id="compare-prompt")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#compare-prompt", Input).focus()
        self.show_stored()

    def _new_round(self, question: str, labels: list[str]) -> list[Column]:
        criteria = list(getattr(self.judge, "criteria", []) or [])
        columns = [Column(label, self.session.persona.name, criteria) for label in labels]
        rounds = self.query_one("#rounds", VerticalScroll)
        rounds.mount(Static(Text.assemble(("あなた ", "bold cyan"), plain(question)),
                            classes="question", markup=False))
        rounds.mount(Horizontal(*columns, classes="round"))
        self.rounds.append(columns)
        return columns

    def show_stored(self) -> None:
        """A reopened comparison: its questions and every combination's reply."""
        question: str | None = None
        replies: list[dict] = []
        for row in self.session.messages() + [{"role": "user", "content": None}]:
            if row["role"] == "user":
                if question is not None:
                    labels = [f"{r['variant']} · RAG {'on' if r['rag'] else 'off'}"
                              for r in replies]
                    for column, reply in zip(self._new_round(question, labels), replies,
                                             strict=True):
                        column.reply.append(reply["content"])
                        column.reply.finish(reply["status"])
                        column.message = reply
                        if reply["status"] == "error":
                            column.show_error(reply.get("error"))
                question, replies = row["content"], []
            elif row["role"] == "assistant":
                replies.append(row)

    @on(Input.Submitted, "#compare-prompt")
    def ask(self, event: Input.Submitted) -> None:
        text = event.value.strip()
        if not text or self.busy:
            return
        event.input.value = ""
        self.busy = True
        self.start_round(text)

    def start_round(self, text: str) -> None:
        self._new_round(text, [c.label for c in self.combos])
        self.run_compare(len(self.rounds) - 1, text)

    @work(thread=True, exclusive=True, exit_on_error=False, group="compare",
          description="compare variants")
    def run_compare(self, round_no: int, text: str) -> None:
        from pipelines.chat import TurnDone, compare

        worker = get_current_worker()
        buffers: dict[int, list[str]] = {}
        last = time.monotonic()
        finals: dict[int, Any] = {}
        done: dict[int, dict] = {}
        stream = compare(self.session, text, self.combos)
        try:
            for index, event in stream:
                if worker.is_cancelled:
                    break
                if isinstance(event, TurnDone):
                    done[index] = event.message
                    self._flush(round_no, buffers)
                    self.post_message(ColumnDone(round_no, index, event.message,
                                                 finals.get(index)))
                elif getattr(event, "done", False):
                    finals[index] = event
                elif hasattr(event, "text"):
                    buffers.setdefault(index, []).append(event.text)
                    if time.monotonic() - last >= FLUSH_S:
                        self._flush(round_no, buffers)
                        last = time.monotonic()
        finally:
            stream.close()
            self._flush(round_no, buffers)
            for index in range(len(self.combos)):
                if index not in done:
                    self.post_message(ColumnDone(round_no, index, None, None))

    def _flush(self, round_no: int, buffers: dict[int, list[str]]) -> None:
        for index, parts in buffers.items():
            if parts:
                self.post_message(ColumnChunk(round_no, index, "".join(parts)))
                parts.clear()

    def on_column_chunk(self, event: ColumnChunk) -> None:
        self.rounds[event.round][event.index].reply.append(event.text)

    def on_column_done(self, event: ColumnDone) -> None:
        from pipelines.style import reply_style

        column = self.rounds[event.round][event.index]
        row = event.message
        column.message = row
        notice = (getattr(event.final, "extra", None) or {}).get("notice")
        if notice:
            self.notify(notice, severity="warning", markup=False, timeout=15)
        column.reply.finish(row["status"] if row else "incomplete")
        if row is not None and row["content"]:
            column.badges.set_style(reply_style(row["content"], self.session.persona.speech,
                                                row.get("stop_reason")).checks)
        if row is not None and row["status"] == "error":
            column.show_error(row.get("error"))
            self.notify(row.get("error") or "generation failed", severity="error",
                        markup=False)
        if row is not None and row["status"] == "complete" and self.judge is not None:
            self.judge_column(column, row)
        if all(c.reply.state != "streaming" for c in self.rounds[event.round]):
            self.busy = False

    @work(exit_on_error=False, group="judge", description="judge a compared reply")
    async def judge_column(self, column: Column, row: dict) -> None:
        question = next((m["content"] for m in reversed(self.session.messages())
                         if m["role"] == "user"), "")
        async for verdict in self.judge.stream_verdicts(
                question=question, reply=row["content"], message_id=row["id"], history=[]):
            column.badges.set_verdict(verdict)

    def action_cancel(self) -> None:
        if self.busy:
            self.workers.cancel_group(self, "compare")
            return
        self.app.pop_screen()
