"""The chat screen: the transcript, the status line, the details pane and the prompt box;
each reply streamed from a thread worker, judged, and acted on (regenerate, browse the
alternatives, edit, rate, copy, export). The app (console/app.py) owns the session, the
backend pool, the variants and the judge; its bindings and palette reach the actions here.

Streamed text is batched (flushed every FLUSH_S) rather than re-rendered per token; Escape
cancels the reply in flight and the session stores it as `incomplete`."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.containers import Horizontal, VerticalScroll
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Footer, Input, Static
from textual.worker import Worker, get_current_worker

from console.widgets import Exchange, RatePanel, ReplyEditor, plain

FLUSH_S = 0.03  # batch streamed text: ~33 screen updates a second at most


@dataclass
class ReplyChunk(Message):
    exchange: Exchange
    text: str


@dataclass
class ReplyRetrieved(Message):
    exchange: Exchange
    hits: list[Any]


@dataclass
class ReplyDone(Message):
    exchange: Exchange
    message: dict[str, Any] | None  # the stored assistant row
    final: Any  # the last Delta (speed, stop reason), None when cut short
    # a regenerated reply: its group (position order) and which one is chosen now
    alternatives: list[dict[str, Any]] | None = None
    chosen: str | None = None


@dataclass
class ReplyEdited(Message):
    exchange: Exchange
    message: dict[str, Any]  # the new row holding the edited text
    alternatives: list[dict[str, Any]]


@dataclass
class ReplyRated(Message):
    panel: RatePanel
    labels: dict[str, int]



class ChatScreen(Screen[None]):
    """The console's first screen (the app's CSS lays it out)."""

    def __init__(self) -> None:
        super().__init__()
        self.exchanges: list[Exchange] = []
        self.current: Exchange | None = None  # the exchange whose reply is streaming
        self.last_final: Any = None
        self._choice_lock = threading.Lock()  # choices are stored in the order made

    # what the app owns, read where it is now (a reopened chat replaces the session)
    session = property(lambda self: self.app.session)
    judge = property(lambda self: self.app.judge)
    judge_note = property(lambda self: self.app.judge_note)
    criteria = property(lambda self: self.app.criteria)
    rate_criteria = property(lambda self: self.app.rate_criteria)
    workspace = property(lambda self: self.app.workspace)
    export_dir = property(lambda self: self.app.export_dir)

    def compose(self) -> ComposeResult:
        yield Static("", id="status", markup=False)
        with Horizontal(id="body"):
            yield VerticalScroll(id="transcript")
            yield VerticalScroll(Static("", id="side-text", markup=False), id="side")
        yield Input(placeholder="メッセージを入力 (Enter で送信)", id="prompt")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#prompt", Input).focus()
        self.refresh_status()
        self.load_history()

    def reload(self) -> None:
        """The session was replaced (a past chat reopened): show its transcript."""
        self.exchanges.clear()
        self.query_one("#transcript", VerticalScroll).remove_children()
        self.load_history()
        self.refresh_status()

    def close_panel(self) -> bool:
        """Escape: close the open rating panel or reply editor; False when none is open."""
        panel = self.open_panel()
        if panel is not None:
            panel.remove()
            self.query_one("#prompt", Input).focus()
        return panel is not None

    @on(Worker.StateChanged)
    def worker_changed(self, event: Worker.StateChanged) -> None:
        self.app.worker_failed(event)  # the app's handler is the one place for failures

    def worker_failed(self, worker: Any) -> None:
        """A reply worker failed (the app said so): its exchange stops streaming."""
        if worker.group == "reply" and self.current is not None:
            if self.current.message is not None and self.current.reply.state == "streaming":
                self.current.show(self.current.message)  # a regeneration that never began
            else:
                self.current.reply.finish("error")
            self.current = None

    def refresh_status(self) -> None:
        """One line, most useful first (it is cut at the right edge at 80 columns)."""
        s = self.session
        parts = [(f"{s.persona.name} ", "bold magenta"),
                 (f"{s.variant.name} ", "bold"),
                 (f"RAG {'on' if s.rag else 'off'} ", "green" if s.rag else "dim")]
        f = self.last_final
        if f is not None:
            if f.ttft_s is not None:
                parts.append((f"TTFT {f.ttft_s * 1000:.0f} ms ", ""))
            if f.tokens_per_s:
                parts.append((f"{f.tokens_per_s:.1f} tok/s ", ""))
            parts.append((f"{f.stop_reason} ", "" if f.stop_reason == "eos" else "yellow"))
        judge = getattr(self.judge, "label", None) or "judge: none"
        parts.append((f"| {judge}", "dim"))
        self.query_one("#status", Static).update(Text.assemble(*parts))

    def load_history(self) -> None:
        """A resumed session shows its past exchanges (no re-judging): each question with
        its chosen reply, how many alternatives it has, and your ratings."""
        from pipelines.feedback import labels_for

        rows = self.session.visible_messages()
        replies = [r for r in rows if r["role"] == "assistant"]
        labels = labels_for(self.session.store, [r["id"] for r in replies]) if replies else {}
        shared = Counter(r["seq"] for r in self.session.messages() if r["role"] == "assistant")
        pending: Exchange | None = None
        for row in rows:
            if row["role"] == "user":
                pending = self._new_exchange(row["content"], judged=False)
            elif row["role"] == "assistant" and pending is not None:
                grouped = shared[row["seq"]] > 1  # regenerated or edited
                pending.show(row, self.session.alternatives(row["id"]) if grouped else None)
                pending.badges.set_labels(labels.get(row["id"], {}))
                pending = None
        if pending is not None:
            pending.reply.finish("error")

    def _new_exchange(self, question: str, judged: bool = True) -> Exchange:
        criteria = self.criteria if judged else []
        note = None if (self.judge is not None or not judged) else self.judge_note
        exchange = Exchange(question, self.session.persona.name, criteria, note)
        self.exchanges.append(exchange)
        self.query_one("#transcript", VerticalScroll).mount(exchange)
        return exchange

    # --- sending ---------------------------------------------------------------------------

    @on(Input.Submitted, "#prompt")
    def send(self, event: Input.Submitted) -> None:
        text = event.value.strip()
        if not text:
            return
        if self.current is not None:
            self.notify("a reply is still streaming (Escape cancels it)", severity="warning",
                        markup=False)
            return  # keep what was typed in the box
        event.input.value = ""
        self.current = self._new_exchange(text)
        self.query_one("#transcript", VerticalScroll).scroll_end(animate=False)
        self.generate(self.current, text)

    @work(thread=True, exclusive=True, exit_on_error=False, group="reply",
          description="generate a reply")
    def generate(self, exchange: Exchange, text: str) -> None:
        self._prepare_backend()
        self._stream_reply(exchange, self.session.send(text))

    @work(thread=True, exclusive=True, exit_on_error=False, group="reply",
          description="regenerate a reply")
    def regenerate_reply(self, exchange: Exchange, original: dict[str, Any]) -> None:
        self._prepare_backend()
        self._stream_reply(exchange, self.session.regenerate(original["id"]), original)

    def _prepare_backend(self) -> None:
        session = self.session
        if session.variant.name not in session.pool and self.workspace is not None:
            from pipelines.inference.sources import making_notice

            # a model made on first use (the dequantised 270M) takes a minute: say so
            notice = making_notice(session.variant, self.workspace.settings.home_path())
            if notice:
                self.app.call_from_thread(self.notify, notice, markup=False, timeout=15)

    def _stream_reply(self, exchange: Exchange, stream: Any,
                      original: dict[str, Any] | None = None) -> None:
        """Runs in the reply worker: the turn's events become batched chunks and one
        ReplyDone. `original`: the reply being regenerated."""
        from pipelines.chat import Retrieved, TurnDone

        worker = get_current_worker()
        session = self.session
        buffer: list[str] = []
        last_flush = time.monotonic()
        final = message = None
        try:
            for event in stream:
                if worker.is_cancelled:
                    break
                if isinstance(event, Retrieved):
                    self.post_message(ReplyRetrieved(exchange, event.hits))
                elif isinstance(event, TurnDone):
                    message = event.message
                elif event.done:
                    final = event
                else:
                    buffer.append(event.text)
                    now = time.monotonic()
                    if now - last_flush >= FLUSH_S:
                        self.post_message(ReplyChunk(exchange, "".join(buffer)))
                        buffer.clear()
                        last_flush = now
        finally:
            stream.close()  # on cancel: stops generation and stores the reply as incomplete
            if buffer:
                self.post_message(ReplyChunk(exchange, "".join(buffer)))
            if original is not None:
                self.post_message(self._regenerated(exchange, original, message, final))
            else:
                if message is None:
                    rows = session.messages()
                    message = rows[-1] if rows and rows[-1]["role"] == "assistant" else None
                self.post_message(ReplyDone(exchange, message, final))

    def _regenerated(self, exchange: Exchange, original: dict[str, Any],
                     message: dict[str, Any] | None, final: Any) -> ReplyDone:
        from pipelines.feedback import FeedbackError, chosen_id

        try:
            group = self.session.alternatives(original["id"])
            chosen = chosen_id(self.session.store, original["id"])
        except FeedbackError:  # the original was deleted meanwhile
            group, chosen = ([message] if message else []), message and message["id"]
        return ReplyDone(exchange, message, final, group, chosen)

    def on_reply_chunk(self, event: ReplyChunk) -> None:
        event.exchange.reply.append(event.text)
        self.query_one("#transcript", VerticalScroll).scroll_end(animate=False)

    def on_reply_retrieved(self, event: ReplyRetrieved) -> None:
        event.exchange.hits = list(event.hits)

    def on_reply_done(self, event: ReplyDone) -> None:
        from pipelines.style import reply_style

        exchange = event.exchange
        row = event.message
        if event.alternatives is not None:
            self.alternative_done(event)
            return
        exchange.message = row
        status = row["status"] if row else "incomplete"
        exchange.reply.finish(status)
        if event.final is not None:
            self.last_final = event.final
            self.notify_backend(event.final)
        if row is not None and row["status"] == "error":
            self.notify(row.get("error") or "generation failed", severity="error",
                        markup=False, timeout=8)
        if row is not None and row["content"]:
            exchange.badges.set_style(reply_style(row["content"], self.session.persona.speech,
                                                  row.get("stop_reason")).checks)
        if self.current is exchange:
            self.current = None
        self.refresh_status()
        if row is not None and status == "complete" and self.judge is not None:
            self.judge_reply(exchange)

    def notify_backend(self, final: Any) -> None:
        """What the backend said of a reply beyond the reply itself (a server that refused
        the system role, so the prompt is now folded): one notification."""
        notice = (getattr(final, "extra", None) or {}).get("notice")
        if notice:
            self.notify(notice, severity="warning", markup=False, timeout=15)

    def alternative_done(self, event: ReplyDone) -> None:
        """A regenerated reply ended: show the group's chosen one (the new reply, unless it
        failed or was cut short before any text)."""
        exchange, row = event.exchange, event.message
        if event.final is not None:
            self.last_final = event.final
            self.notify_backend(event.final)
        if row is not None and row["status"] == "error":
            self.notify(row.get("error") or "generation failed", severity="error",
                        markup=False, timeout=8)
        group = event.alternatives or []
        shown = next((r for r in group if r["id"] == event.chosen), None) or (
            group[-1] if group else row)
        if self.current is exchange:
            self.current = None
        if shown is not None:
            self.show_alternative(exchange, shown, group)
        self.refresh_status()

    def show_alternative(self, exchange: Exchange, row: dict[str, Any],
                         group: list[dict[str, Any]] | None = None) -> None:
        """Show one reply of a group, its style badges, and its judge's verdicts (asked
        once: the judge keeps every verdict)."""
        from pipelines.style import reply_style

        exchange.show(row, group)
        if row["content"]:
            exchange.badges.set_style(reply_style(row["content"], self.session.persona.speech,
                                                  row.get("stop_reason")).checks)
        if (self.judge is not None and exchange.badges.criteria and row["status"] == "complete"
                and not exchange.badges.verdicts):
            self.judge_reply(exchange)

    @work(exclusive=False, exit_on_error=False, group="judge", description="judge a reply")
    async def judge_reply(self, exchange: Exchange) -> None:
        """Scores arrive criterion by criterion without blocking the stream or the keys."""
        row = exchange.message
        # the history the model was sent with this reply goes with it (one rule:
        # pipelines.turn; the Stability criterion reads it), read off the event loop
        earlier = await asyncio.to_thread(self.session.history, row["seq"])
        async for verdict in self.judge.stream_verdicts(
            question=exchange.question, reply=row["content"], message_id=row["id"],
            history=earlier):
            exchange.set_verdict(row["id"], verdict)  # the user may have browsed away

    def selected(self) -> Exchange | None:
        focused = self.app.focused
        if isinstance(focused, Exchange):
            return focused
        done = [e for e in self.exchanges if e.message is not None]
        return done[-1] if done else None

    # --- feedback on a reply: alternatives, edits, ratings -------------------------------

    def reply_to_act_on(self, doing: str) -> Exchange | None:
        """The selected reply, if it can be acted on now (else a one-line notification)."""
        if self.app.screen is not self:
            return None  # another screen (compare, jobs, ...) is on top
        exchange = self.selected()
        if exchange is None or exchange.message is None:
            self.notify(f"no reply to {doing} yet", severity="warning", markup=False)
            return None
        if exchange is self.current:
            self.notify("that reply is still streaming (Escape cancels it)",
                        severity="warning", markup=False)
            return None
        return exchange

    def open_panel(self) -> Any:
        """The rating panel or reply editor already open (one at a time: what is typed in
        it is never thrown away by opening another)."""
        panel = self.query("RatePanel, ReplyEditor")
        return panel.first() if panel else None

    def action_regenerate(self) -> None:
        if self.current is not None:
            self.notify("a reply is still streaming (Escape cancels it)", severity="warning",
                        markup=False)
            return
        exchange = self.reply_to_act_on("regenerate")
        if exchange is None:
            return
        if self.open_panel() is not None:
            self.notify("close the open panel first (Escape)", severity="warning", markup=False)
            return
        original = exchange.message
        exchange.begin_again()
        self.current = exchange
        self.regenerate_reply(exchange, original)

    def action_alternative(self, step: int) -> None:
        """Show the previous / next alternative of the selected reply; the one shown is the
        one that continues the conversation."""
        exchange = self.reply_to_act_on("browse")
        if exchange is None:
            return
        group = exchange.alternatives
        if len(group) < 2:
            key = self.app.key_of("regenerate", "ctrl+n")
            self.notify(f"this reply has no alternatives ({key} makes one)", markup=False)
            return
        index = min(max(exchange.position + step, 0), len(group) - 1)
        if index == exchange.position:
            return
        self.show_alternative(exchange, group[index])
        self.store_choice(exchange)

    @work(thread=True, exit_on_error=False, group="feedback", description="choose a reply")
    def store_choice(self, exchange: Exchange) -> None:
        with self._choice_lock:  # the latest choice shown is the one stored last
            self.session.choose(exchange.message["id"])

    def action_edit_reply(self) -> None:
        if self.app.screen is not self:
            return
        panel = self.open_panel()
        if isinstance(panel, ReplyEditor):
            self.save_edit(panel, panel.exchange, panel.message_id, panel.text)
            return
        if panel is not None:
            panel.focus()
            return
        exchange = self.reply_to_act_on("edit")
        if exchange is None:
            return
        key = self.app.key_of("edit_reply", "f2")
        editor = ReplyEditor(exchange, f"edit the reply: {key} saves and continues from it "
                             "(the original is kept), Escape closes")
        self.mount(editor, before=self.query_one("#prompt"))  # it takes the focus

    @work(thread=True, exit_on_error=False, group="feedback", description="save the edit")
    def save_edit(self, editor: ReplyEditor, exchange: Exchange, message_id: str,
                  text: str) -> None:
        row = self.session.edit(message_id, text)  # FeedbackError: one line, editor kept
        self.post_message(ReplyEdited(exchange, row, self.session.alternatives(row["id"])))

    def on_reply_edited(self, event: ReplyEdited) -> None:
        for editor in self.query(ReplyEditor):
            if editor.exchange is event.exchange:
                editor.remove()
        self.show_alternative(event.exchange, event.message, event.alternatives)
        self.query_one("#prompt", Input).focus()

    def action_rate_reply(self) -> None:
        if self.app.screen is not self:
            return
        panel = self.open_panel()
        if panel is not None:
            (panel if isinstance(panel, RatePanel) else panel.area).focus()
            return
        exchange = self.reply_to_act_on("rate")
        if exchange is None:
            return
        keys = (f"{self.app.key_of('thumbs_up', 'u')} 👍 / "
                f"{self.app.key_of('thumbs_down', 'd')} 👎")
        panel = RatePanel(exchange, self.rate_criteria, keys)
        self.mount(panel, before=self.query_one("#prompt"))
        panel.focus()

    def on_rate_panel_saved(self, event: RatePanel.Saved) -> None:
        if not event.labels:
            event.panel.remove()
            self.query_one("#prompt", Input).focus()
            return
        self.save_labels(event.panel, event.labels)

    @work(thread=True, exit_on_error=False, group="feedback", description="save the rating")
    def save_labels(self, panel: RatePanel, labels: dict[str, int]) -> None:
        from pipelines.feedback import record_label

        for criterion, score in labels.items():  # FeedbackError: one line, panel kept
            record_label(self.session.store, panel.message_id, criterion, score)
        self.post_message(ReplyRated(panel, labels))

    def on_reply_rated(self, event: ReplyRated) -> None:
        panel = event.panel
        exchange = panel.exchange
        if exchange.message is not None and exchange.message["id"] == panel.message_id:
            exchange.badges.set_labels(event.labels)
        else:  # browsed to another alternative meanwhile
            exchange.keep_labels(panel.message_id, event.labels)
        panel.remove()
        self.query_one("#prompt", Input).focus()

    def action_copy_reply(self) -> None:
        exchange = self.selected()
        if exchange is None:
            return
        # OSC 52: the terminal on the user's side of the SSH connection takes the text.
        self.app.copy_to_clipboard(f"あなた: {exchange.question}\n"
                               f"{self.session.persona.name}: {exchange.reply.text}")
        self.notify("copied the exchange (OSC 52)", markup=False)

    def action_export(self) -> None:
        from pipelines.export_md import session_markdown
        from pipelines.files import write_atomic

        path = self.export_dir / f"kyara-{self.session.session_id[:8]}.md"
        try:
            write_atomic(path, session_markdown(self.session))
        except OSError as exc:
            self.notify(f"export failed: {path}: {exc.strerror or exc}", severity="error",
                        markup=False)
            return
        self.notify(f"exported to {path}", markup=False)

    def action_toggle_side(self) -> None:
        side = self.query_one("#side")
        side.toggle_class("open")
        if side.has_class("open"):
            self.show_details(self.selected())

    def show_details(self, exchange: Exchange | None) -> None:
        text = Text()
        if exchange is None:
            text.append("no reply selected", style="dim")
        else:
            text.append("retrieved facts\n", style="bold")
            for hit in exchange.hits:
                text.append(f"{hit.fact_id} ", style="cyan")
                text.append_text(plain(hit.text))
                text.append("\n")
            if not exchange.hits:
                text.append("(none: retrieval off)\n", style="dim")
            for name, verdict in exchange.badges.verdicts.items():
                text.append(f"\n{name}: {verdict.status} {verdict.score}\n", style="bold")
                text.append_text(plain(verdict.reasoning or verdict.raw_text or ""))
                text.append("\n")
            if exchange.badges.labels:
                text.append("\nyour rating\n", style="bold")
                for name, score in exchange.badges.labels.items():
                    shown = {1: "down", 2: "up"}.get(score) if name == "thumbs" else score
                    text.append(f"{name}: {shown}\n")
        self.query_one("#side-text", Static).update(text)

    def on_descendant_focus(self, event: Any) -> None:
        if isinstance(event.widget, Exchange) and self.query_one("#side").has_class("open"):
            self.show_details(event.widget)
