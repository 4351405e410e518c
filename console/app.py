"""The chat console (Textual). Never imports torch: models are reached through
pipelines.chat, from a thread worker, because the backends stream synchronously.

Shape of the app, after harlequin and oterm (../shared/STYLE.md):
- every blocking call is a named thread worker that posts small Messages back;
- all worker failures go through one `Worker.StateChanged` handler and become a
  notification: the app and the transcript stay;
- the chat itself (transcript, streaming, feedback on replies) is `ChatScreen`
  (console/chat_screen.py), the first screen; the app owns what every screen shares: the
  session, the loaded backends (one `BackendPool`: chat, compare and blind A/B), the
  variants, the judge, and one action table (`ACTIONS`) that makes both the key bindings
  and the command palette.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from rich.text import Text
from textual import on, work
from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.message import Message
from textual.widgets import Input, OptionList
from textual.widgets.option_list import Option
from textual.worker import Worker, WorkerState, get_current_worker

from console.chat_screen import ChatScreen, ReplyChunk, ReplyDone
from console.widgets import Exchange
from pipelines.pool import BackendPool

__all__ = ["ACTIONS", "KyaraApp", "ReplyChunk", "ReplyDone", "build_app"]


@dataclass(frozen=True)
class Action:
    """One thing the console does, from anywhere (the input box included): its key (a
    priority binding; the footer shows `label`) and its command-palette entry (`title`)."""

    name: str  # runs `action_<name>(*args)`; the binding's id, as the user's keymap names it
    key: str | None = None  # None: the palette only
    label: str = ""
    title: str | None = None  # None: a key only
    help: str = ""
    args: tuple[Any, ...] = ()


# Bindings in this order (the footer's), palette entries in this order too.
ACTIONS: tuple[Action, ...] = (
    Action("cancel", "escape", "Cancel"),
    Action("toggle_rag", "ctrl+r", "RAG", "Retrieval: toggle",
           "persona facts in the prompt on / off"),
    Action("switch_variant", "ctrl+t", "Variant"),
    Action("compare", "ctrl+k", "Compare", "Compare variants",
           "one question to several combinations"),
    Action("history", "ctrl+g", "History", "History", "past chats and comparisons"),
    Action("jobs", "ctrl+j", "Jobs"),
    Action("reports", title="Reports", help="evaluation runs: headline tables and charts"),
    Action("copy_reply", "ctrl+y", "Copy"),
    Action("export", "ctrl+o", "Export", "Export session to Markdown"),
    Action("toggle_side", "ctrl+s", "Details"),
    Action("quit", "ctrl+q", "Quit"),
    # feedback on the selected reply (the focused one, else the last); ← / → browse its
    # alternatives when it is focused (Exchange's bindings)
    Action("regenerate", "ctrl+n", "Regenerate", "Reply: regenerate",
           "answer the selected reply's question again (sampling on); ← / → browse the "
           "alternatives"),
    Action("alternative", title="Reply: previous alternative",
           help="show and continue from it", args=(-1,)),
    Action("alternative", title="Reply: next alternative", help="show and continue from it",
           args=(1,)),
    Action("edit_reply", "f2", "Edit", "Reply: edit",
           "edit the selected reply and continue from the edited text (the original is kept)"),
    Action("rate_reply", "ctrl+l", "Rate", "Reply: rate",
           "1–7 on each criterion and thumbs up / down"),
    Action("blind_compare", "ctrl+b", "Blind A/B", "Blind A/B",
           "two combinations, names hidden and sides shuffled until you vote"),
)


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
    BINDINGS = [Binding(a.key, a.name, a.label, id=a.name, priority=True)
                for a in ACTIONS if a.key]

    def __init__(self, session: Any, *, variants: dict[str, Any],
                 backend_loader: Callable[[Any], Any] | None,
                 judge: Any = None, judge_note: str | None = None,
                 export_dir: Path | None = None, keymap: dict[str, str] | None = None,
                 compare_spec: list[str] | None = None, workspace: Any = None,
                 config_problems: list[str] | None = None,
                 rate_criteria: list[str] | None = None) -> None:
        super().__init__()
        self.session = session
        self.variants = variants  # name -> Variant config
        # the loaded backends of every screen, by variant: Variant -> ChatBackend (blocking)
        # loads one on first use; the session's own backend joins it; closed on exit
        self.pool = BackendPool(backend_loader)
        session.share(self.pool)
        self.judge = judge  # pipelines.judge live API, or None when no judge is configured
        self.judge_note = judge_note
        self.export_dir = export_dir or Path.cwd()
        self._keymap = keymap or {}
        self.compare_spec = compare_spec or []
        self.workspace = workspace  # for the jobs screen and re-reading variants
        self.config_problems = list(config_problems or [])  # files left out, one line each
        # what you rate when no judge is reachable: the configured judge's criteria
        self._rate_criteria = list(rate_criteria or [])
        self.chat = ChatScreen()

    # --- layout --------------------------------------------------------------------------

    def get_default_screen(self) -> ChatScreen:
        return self.chat

    def on_mount(self) -> None:
        if self._keymap:
            self.set_keymap(self._keymap)
        for line in self.config_problems:  # a bad file is named, never fatal
            self.notify(f"left out: {line}", severity="warning", markup=False, timeout=15)

    def on_unmount(self) -> None:
        """Loaded models live in worker processes: let them go with the console."""
        self.pool.close()

    @property
    def exchanges(self) -> list[Exchange]:
        return self.chat.exchanges

    @property
    def current(self) -> Exchange | None:
        """The exchange whose reply is streaming, if any."""
        return self.chat.current

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

    def get_system_commands(self, screen: Any):
        """The command palette (ctrl+p): Textual's own commands, one entry per model variant,
        the console's actions (`ACTIONS`) and one per job file."""
        yield from super().get_system_commands(screen)
        for name, variant in self.variants.items():
            yield SystemCommand(f"Variant: {name}", f"chat with {name} ({variant.backend}) "
                                "from the next message",
                                lambda n=name: self.set_variant(n))
        for action in ACTIONS:
            if action.title is not None:
                yield SystemCommand(action.title, action.help,
                                    partial(getattr(self, f"action_{action.name}"),
                                            *action.args))
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

    @on(Worker.StateChanged)
    def worker_failed(self, event: Worker.StateChanged) -> None:
        """The one place worker failures surface: a notification; the app stays up."""
        if event.state != WorkerState.ERROR:
            return
        error = event.worker.error
        self.notify(f"{event.worker.description}: {error}", severity="error", markup=False,
                    timeout=8)
        self.chat.worker_failed(event.worker)

    # --- actions ---------------------------------------------------------------------------

    def action_cancel(self) -> None:
        if self.screen is not self.chat and hasattr(self.screen, "action_cancel"):
            self.screen.action_cancel()  # Escape belongs to the screen on top (compare, ...)
            return
        if self.chat.close_panel():
            return
        picker = self.query(VariantPicker)
        if picker:
            picker.first().remove()
            self.query_one("#prompt", Input).focus()
            return
        if self.chat.current is not None:
            self.workers.cancel_group(self.chat, "reply")

    def action_toggle_rag(self) -> None:
        if not self.session.rag and self.session.retriever is None:
            self.notify(f"persona not indexed: run `kyara index {self.session.persona.id}`",
                        severity="warning", markup=False)
            return
        self.session.rag = not self.session.rag
        self.chat.refresh_status()

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
        self.session.use(variant)  # its backend from the pool: loaded on first use
        self.chat.refresh_status()
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
                              pool=self.pool, retriever=s.retriever, kind="compare")
        return session, combos

    def action_compare(self) -> None:
        from console.compare import CompareScreen
        from pipelines.chat import default_combos

        found = self._comparison(default_combos)
        if found is not None:
            session, combos = found
            self.push_screen(CompareScreen(session, combos, judge=self.judge))

    def action_history(self) -> None:
        from console.history import HistoryScreen

        if self.screen is self.chat and self.chat.current is None:
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
                                      pool=self.pool, retriever=s.retriever, kind="compare")
            self.push_screen(CompareScreen(past, [], judge=self.judge))
            return
        self.session = ChatSession.resume(
            s.store, row["id"], persona=s.persona, variant=variant, retriever=s.retriever,
            rag=s.rag, pool=self.pool)
        self.chat.reload()

    def action_blind_compare(self) -> None:
        from console.blind import BlindScreen, blind_pair

        if self.screen is not self.chat:
            return
        found = self._comparison(blind_pair)
        if found is None:
            return
        session, combos = found
        self.push_screen(BlindScreen(session, combos, judge=self.judge,
                                     keys={k: self.key_of(k, d) for k, d in (
                                         ("vote_a", "a"), ("vote_b", "b"), ("vote_tie", "t"))}))

    # the chat screen's actions, reached from the app's bindings and palette

    def action_regenerate(self) -> None:
        self.chat.action_regenerate()

    def action_alternative(self, step: int) -> None:
        self.chat.action_alternative(step)

    def action_edit_reply(self) -> None:
        self.chat.action_edit_reply()

    def action_rate_reply(self) -> None:
        self.chat.action_rate_reply()

    def action_copy_reply(self) -> None:
        self.chat.action_copy_reply()

    def action_export(self) -> None:
        self.chat.action_export()

    def action_toggle_side(self) -> None:
        self.chat.action_toggle_side()


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
