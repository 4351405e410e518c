"""The chat console (Textual). Never imports torch: models are reached through
pipelines.chat, from a thread worker, because the backends stream synchronously.

Shape of the app, after harlequin and oterm (../shared/STYLE.md):
- every blocking call is a named thread worker that posts small Messages back;
- all worker failures go through one `Worker.StateChanged` handler and become a
  notification: the app and the transcript stay;
- streamed text is batched (flushed every FLUSH_S) rather than re-rendered per token;
- Escape cancels the reply in flight; the session stores it as `incomplete`.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.text import Text
from textual import on, work
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.message import Message
from textual.widgets import Footer, Input, OptionList, Static
from textual.widgets.option_list import Option
from textual.worker import Worker, WorkerState, get_current_worker

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


@dataclass
class VariantsReread(Message):
    """The variant files, read again after a job finished (a thread worker read them)."""

    variants: dict[str, Any]
    problems: list[str]


class VariantPicker(OptionList):
    """A small in-screen list to pick the model variant for the next message."""

    DEFAULT_CSS = "VariantPicker { height: auto; max-height: 10; border: round $accent; }"


class KyaraApp(App[None]):
    TITLE = "kyara"
    CSS = """
    #status { height: 1; background: $panel; color: $text; padding: 0 1; }
    #body { height: 1fr; }
    #transcript { width: 1fr; padding: 0 1; }
    #side { width: 40%; display: none; border-left: solid $accent; padding: 0 1; }
    #side.open { display: block; }
    #prompt { height: 3; }
    """
    # priority: these act from anywhere, the input box included (Input has its own ctrl+k)
    BINDINGS = [
        Binding("escape", "cancel", "Cancel", id="cancel", priority=True),
        Binding("ctrl+r", "toggle_rag", "RAG", id="toggle_rag", priority=True),
        Binding("ctrl+t", "switch_variant", "Variant", id="switch_variant", priority=True),
        Binding("ctrl+k", "compare", "Compare", id="compare", priority=True),
        Binding("ctrl+g", "history", "History", id="history", priority=True),
        Binding("ctrl+j", "jobs", "Jobs", id="jobs", priority=True),
        Binding("ctrl+y", "copy_reply", "Copy", id="copy_reply", priority=True),
        Binding("ctrl+o", "export", "Export", id="export", priority=True),
        Binding("ctrl+s", "toggle_side", "Details", id="toggle_side", priority=True),
        Binding("ctrl+q", "quit", "Quit", id="quit", priority=True),
        # feedback on the selected reply (the focused one, else the last); ← / → browse its
        # alternatives when it is focused (Exchange's bindings)
        Binding("ctrl+n", "regenerate", "Regenerate", id="regenerate", priority=True),
        Binding("f2", "edit_reply", "Edit", id="edit_reply", priority=True),
        Binding("ctrl+l", "rate_reply", "Rate", id="rate_reply", priority=True),
        Binding("ctrl+b", "blind_compare", "Blind A/B", id="blind_compare", priority=True),
    ]

    def __init__(self, session: Any, *, variants: dict[str, Any], backend_loader: Any,
                 judge: Any = None, judge_note: str | None = None,
                 export_dir: Path | None = None, keymap: dict[str, str] | None = None,
                 compare_spec: list[str] | None = None, workspace: Any = None,
                 config_problems: list[str] | None = None,
                 rate_criteria: list[str] | None = None) -> None:
        super().__init__()
        self.session = session
        self.variants = variants  # name -> Variant config
        self.backend_loader = backend_loader  # Variant -> ChatBackend (blocking)
        self.backends: dict[str, Any] = {session.variant.name: session.backend}
        self.judge = judge  # pipelines.judge live API, or None when no judge is configured
        self.judge_note = judge_note
        self.export_dir = export_dir or Path.cwd()
        self._keymap = keymap or {}
        self.compare_spec = compare_spec or []
        self.workspace = workspace  # for the jobs screen and re-reading variants
        self.config_problems = list(config_problems or [])  # files left out, one line each
        self.exchanges: list[Exchange] = []
        self.current: Exchange | None = None
        self.last_final: Any = None
        # what you rate when no judge is reachable: the configured judge's criteria
        self._rate_criteria = list(rate_criteria or [])
        self._choice_lock = threading.Lock()  # choices are stored in the order made

    # --- layout --------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield Static("", id="status", markup=False)
        with Horizontal(id="body"):
            yield VerticalScroll(id="transcript")
            yield VerticalScroll(Static("", id="side-text", markup=False), id="side")
        yield Input(placeholder="メッセージを入力 (Enter で送信)", id="prompt")
        yield Footer()

    def on_mount(self) -> None:
        if self._keymap:
            self.set_keymap(self._keymap)
        self.query_one("#prompt", Input).focus()
        self.refresh_status()
        self.load_history()
        for line in self.config_problems:  # a bad file is named, never fatal
            self.notify(f"left out: {line}", severity="warning", markup=False, timeout=15)

    def on_unmount(self) -> None:
        """Loaded models live in worker processes: let them go with the console."""
        for backend in {id(b): b for b in self.backends.values()}.values():
            if hasattr(backend, "stream"):
                try:
                    backend.close()
                except Exception:
                    pass

    @property
    def criteria(self) -> list[str]:
        return list(getattr(self.judge, "criteria", []) or [])

    @property
    def rate_criteria(self) -> list[str]:
        """The criteria you rate a reply on: the judge's (1–7, as its scale)."""
        return self.criteria or self._rate_criteria

    def key_of(self, binding_id: str, default: str) -> str:
        """The key bound to an action, as the user's keymap has it (for hints)."""
        return self._keymap.get(binding_id) or default

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

    def get_system_commands(self, screen: Any):
        """The command palette (ctrl+p): Textual's own commands, one entry per model variant,
        and the console's actions."""
        yield from super().get_system_commands(screen)
        for name, variant in self.variants.items():
            yield SystemCommand(f"Variant: {name}", f"chat with {name} ({variant.backend}) "
                                "from the next message",
                                lambda n=name: self.set_variant(n))
        yield SystemCommand("Retrieval: toggle", "persona facts in the prompt on / off",
                            self.action_toggle_rag)
        yield SystemCommand("Compare variants", "one question to several combinations",
                            self.action_compare)
        yield SystemCommand("History", "past chats and comparisons", self.action_history)
        yield SystemCommand("Reports", "evaluation runs: headline tables and charts",
                            self.action_reports)
        yield SystemCommand("Export session to Markdown", "", self.action_export)
        yield SystemCommand("Reply: regenerate", "answer the selected reply's question again "
                            "(sampling on); ← / → browse the alternatives",
                            self.action_regenerate)
        yield SystemCommand("Reply: previous alternative", "show and continue from it",
                            lambda: self.action_alternative(-1))
        yield SystemCommand("Reply: next alternative", "show and continue from it",
                            lambda: self.action_alternative(1))
        yield SystemCommand("Reply: edit", "edit the selected reply and continue from the "
                            "edited text (the original is kept)", self.action_edit_reply)
        yield SystemCommand("Reply: rate", "1–7 on each criterion and thumbs up / down",
                            self.action_rate_reply)
        yield SystemCommand("Blind A/B", "two combinations, names hidden and sides shuffled "
                            "until you vote", self.action_blind_compare)
        yield from self.extra_commands()

    def extra_commands(self):
        if self.workspace is None:
            return
        from pipelines.jobs import offered_jobs

        jobs, _ = offered_jobs(self.workspace)  # bad files and unimplemented kinds left out
        for name, path in jobs.items():
            yield SystemCommand(f"Run job: {name}", f"start {path.name} as a detached job",
                                lambda p=path: self.start_job(p))

    def action_jobs(self) -> None:
        from console.jobs_screen import JobsScreen

        if self.workspace is None:
            self.notify("jobs need the configs directory", severity="warning", markup=False)
            return
        if not isinstance(self.screen, JobsScreen):
            self.push_screen(JobsScreen(self.workspace, self.session.store,
                                        on_finished=self.job_finished))

    def action_reports(self) -> None:
        from console.reports_screen import ReportsScreen

        if self.workspace is None:
            self.notify("reports need the configs directory", severity="warning", markup=False)
            return
        if not isinstance(self.screen, ReportsScreen):
            self.push_screen(ReportsScreen(self.workspace.settings.home_path(),
                                           self.session.store))

    def start_job(self, path: Path) -> None:
        from console.jobs_screen import JobsScreen

        self.action_jobs()
        screen = self.screen
        if isinstance(screen, JobsScreen):
            screen.call_after_refresh(screen.start_job, path)

    def job_finished(self, run: Any) -> None:
        """A finished job may have registered a variant: offer it at once. The variant files
        are read off the event loop; several runs ending together read them once."""
        if self.workspace is None:
            return
        self.reread_variants()

    @work(thread=True, exclusive=True, exit_on_error=False, group="variants",
          description="read the variant files")
    def reread_variants(self) -> None:
        variants, problems = self.workspace.variants()
        if not get_current_worker().is_cancelled:  # a later call reads them again
            self.post_message(VariantsReread(variants, problems))

    def on_variants_reread(self, event: VariantsReread) -> None:
        known = set(self.variants)
        self.variants = event.variants
        for line in event.problems:
            if line not in self.config_problems:
                self.config_problems.append(line)
                self.notify(f"left out: {line}", severity="warning", markup=False, timeout=15)
        for name in sorted(set(self.variants) - known):
            self.notify(f"new variant: {name} (ctrl+t to use it)", markup=False)

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
        name = session.variant.name
        if not hasattr(session.backend, "stream"):
            session.backend = self.backends.get(name) or session.backend
        if not hasattr(session.backend, "stream") and self.workspace is not None:
            from pipelines.inference.sources import making_notice

            # a model made on first use (the dequantised 270M) takes a minute: say so
            notice = making_notice(session.variant, self.workspace.settings.home_path())
            if notice:
                self.call_from_thread(self.notify, notice, markup=False, timeout=15)

    def _stream_reply(self, exchange: Exchange, stream: Any,
                      original: dict[str, Any] | None = None) -> None:
        """Runs in the reply worker: the turn's events become batched chunks and one
        ReplyDone. `original`: the reply being regenerated."""
        from pipelines.chat import Retrieved, TurnDone

        worker = get_current_worker()
        session = self.session
        name = session.variant.name
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
            if hasattr(session.backend, "stream"):
                self.backends[name] = session.backend  # loaded once, kept for next time
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

    @on(Worker.StateChanged)
    def worker_failed(self, event: Worker.StateChanged) -> None:
        """The one place worker failures surface: a notification; the app stays up."""
        if event.state != WorkerState.ERROR:
            return
        error = event.worker.error
        self.notify(f"{event.worker.description}: {error}", severity="error", markup=False,
                    timeout=8)
        if event.worker.group == "reply" and self.current is not None:
            if self.current.message is not None and self.current.reply.state == "streaming":
                self.current.show(self.current.message)  # a regeneration that never began
            else:
                self.current.reply.finish("error")
            self.current = None

    # --- actions ---------------------------------------------------------------------------

    def action_cancel(self) -> None:
        if self.screen is not self.screen_stack[0] and hasattr(self.screen, "action_cancel"):
            self.screen.action_cancel()  # Escape belongs to the screen on top (compare, ...)
            return
        panel = self.query("RatePanel, ReplyEditor")
        if panel:
            panel.first().remove()
            self.query_one("#prompt", Input).focus()
            return
        picker = self.query(VariantPicker)
        if picker:
            picker.first().remove()
            self.query_one("#prompt", Input).focus()
            return
        if self.current is not None:
            self.workers.cancel_group(self, "reply")

    def action_toggle_rag(self) -> None:
        if not self.session.rag and self.session.retriever is None:
            self.notify(f"persona not indexed: run `kyara index {self.session.persona.id}`",
                        severity="warning", markup=False)
            return
        self.session.rag = not self.session.rag
        self.refresh_status()

    def action_switch_variant(self) -> None:
        if self.query(VariantPicker):
            return
        picker = VariantPicker(*[Option(Text(f"{name}  ({v.backend})"), id=name)
                                 for name, v in self.variants.items()])
        self.mount(picker, before=self.query_one("#prompt"))
        picker.focus()

    @on(OptionList.OptionSelected)
    def variant_chosen(self, event: OptionList.OptionSelected) -> None:
        if not isinstance(event.option_list, VariantPicker):
            return
        event.option_list.remove()
        self.set_variant(str(event.option.id))
        self.query_one("#prompt", Input).focus()

    def set_variant(self, name: str) -> None:
        """Applies to the next message; every reply records the variant that made it."""
        variant = self.variants[name]
        self.session.variant = variant
        self.session.backend = self.backends.get(name) or (
            lambda v=variant: self.backend_loader(v))
        self.refresh_status()
        self.notify(f"variant: {name} (from the next message)", markup=False)

    def _comparison(self, pick: Callable[..., Any]) -> tuple[Any, Any] | None:
        """(a compare session, the combinations `pick` chooses: default_combos or
        blind_pair) for a comparison screen; None after a one-line notice."""
        from pipelines.chat import ChatSession
        from pipelines.inference.base import BackendError

        s = self.session
        try:
            home = self.workspace.settings.home_path() if self.workspace is not None else None
            combos = pick(self.variants or {s.variant.name: s.variant}, s.variant,
                          s.retriever is not None, self.compare_spec, home=home)
        except BackendError as exc:
            self.notify(str(exc), severity="error", markup=False)
            return None
        session = ChatSession(store=s.store, persona=s.persona, variant=s.variant,
                              backend=self.backends.get(s.variant.name), retriever=s.retriever,
                              kind="compare")
        return session, combos

    def action_compare(self) -> None:
        from console.compare import CompareScreen
        from pipelines.chat import default_combos

        found = self._comparison(default_combos)
        if found is not None:
            session, combos = found
            self.push_screen(CompareScreen(session, combos, backends=self.backends,
                                           loader=self.backend_loader, judge=self.judge))

    def action_history(self) -> None:
        from console.history import HistoryScreen

        if self.screen is self.screen_stack[0] and self.current is None:
            self.push_screen(HistoryScreen(self.session.store, self.session.persona.id),
                             self.reopen)

    def reopen(self, row: dict[str, Any] | None) -> None:
        """Reopen a past chat in this screen, or a past comparison in its own."""
        from pipelines.chat import ChatSession

        if row is None:
            return
        s = self.session
        variant = self.variants.get(row.get("variant") or "", s.variant)
        if row["kind"] == "compare":
            from console.compare import CompareScreen

            past = ChatSession.resume(s.store, row["id"], persona=s.persona, variant=variant,
                                      backend=None, retriever=s.retriever, kind="compare")
            self.push_screen(CompareScreen(past, [], backends=self.backends,
                                           loader=self.backend_loader, judge=self.judge))
            return
        self.session = ChatSession.resume(
            s.store, row["id"], persona=s.persona, variant=variant, retriever=s.retriever,
            rag=s.rag, backend=self.backends.get(variant.name) or (
                lambda v=variant: self.backend_loader(v)))
        self.exchanges.clear()
        self.query_one("#transcript", VerticalScroll).remove_children()
        self.load_history()
        self.refresh_status()

    def selected(self) -> Exchange | None:
        focused = self.focused
        if isinstance(focused, Exchange):
            return focused
        done = [e for e in self.exchanges if e.message is not None]
        return done[-1] if done else None

    # --- feedback on a reply: alternatives, edits, ratings -------------------------------

    def reply_to_act_on(self, doing: str) -> Exchange | None:
        """The selected reply, if it can be acted on now (else a one-line notification)."""
        if self.screen is not self.screen_stack[0]:
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
            key = self.key_of("regenerate", "ctrl+n")
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
        if self.screen is not self.screen_stack[0]:
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
        key = self.key_of("edit_reply", "f2")
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
        if self.screen is not self.screen_stack[0]:
            return
        panel = self.open_panel()
        if panel is not None:
            (panel if isinstance(panel, RatePanel) else panel.area).focus()
            return
        exchange = self.reply_to_act_on("rate")
        if exchange is None:
            return
        keys = (f"{self.key_of('thumbs_up', 'u')} 👍 / "
                f"{self.key_of('thumbs_down', 'd')} 👎")
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

    def action_blind_compare(self) -> None:
        from console.blind import BlindScreen, blind_pair

        if self.screen is not self.screen_stack[0]:
            return
        found = self._comparison(blind_pair)
        if found is None:
            return
        session, combos = found
        self.push_screen(BlindScreen(session, combos, backends=self.backends,
                                     loader=self.backend_loader, judge=self.judge,
                                     keys={k: self.key_of(k, d) for k, d in (
                                         ("vote_a", "a"), ("vote_b", "b"), ("vote_tie", "t"))}))

    def action_copy_reply(self) -> None:
        exchange = self.selected()
        if exchange is None:
            return
        # OSC 52: the terminal on the user's side of the SSH connection takes the text.
        self.copy_to_clipboard(f"あなた: {exchange.question}\n"
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


def run_app(workspace: Any, persona: Any, variant: Any, resume: str | None = None) -> None:
    """Build the session from the user's configuration and run the app."""
    build_app(workspace, persona, variant, resume).run()


def build_app(workspace: Any, persona: Any, variant: Any, resume: str | None = None
              ) -> KyaraApp:
    """The app, ready to run. A bad variant, judge, criterion or job file (not the one in
    use) is left out and named in a notification; user errors raise as one line."""
    from pipelines.chat import open_session
    from pipelines.inference.worker import spawn_backend

    session = open_session(workspace, persona=persona.id, variant=variant.name, resume=resume)
    variants, _ = workspace.variants()
    variants.setdefault(variant.name, variant)
    home = workspace.settings.home_path()
    judge, note = make_judge(workspace, session)
    return KyaraApp(session, variants=variants, backend_loader=lambda v: spawn_backend(v, home),
                    judge=judge, judge_note=note, keymap=workspace.settings.keymap.model_dump(),
                    compare_spec=workspace.settings.compare, workspace=workspace,
                    config_problems=workspace.problems(),
                    rate_criteria=configured_criteria(workspace))


def configured_criteria(workspace: Any) -> list[str]:
    """The default judge's criteria, to rate replies on even when that judge is not
    reachable (no key): your labels then feed its calibration."""
    from pipelines.config import ConfigError

    name = workspace.settings.default_judge
    try:
        return list(workspace.judge(name).criteria) if name else []
    except ConfigError:  # a bad judge file is named elsewhere; rate thumbs only then
        return []


def make_judge(workspace: Any, session: Any) -> tuple[Any, str | None]:
    """The live judge, or None and a line that says how to configure one."""
    try:
        from pipelines.judge.live import LiveJudge
    except ImportError:
        return None, "judge: not available in this build"
    return LiveJudge.from_workspace(workspace, session.persona, session.store)
