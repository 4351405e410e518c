"""Transcript widgets. Every piece of text from a model, a persona file or a judge is shown
as rich `Text` (never parsed as markup): `[bold]`, `[@click=app.quit]` and escape sequences
appear literally and do nothing."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.containers import Horizontal, Vertical
from textual.widgets import Static

from pipelines.style import StyleCheck


def plain(text: str) -> Text:
    """Untrusted text as a renderable: no markup, control characters made visible."""
    cleaned = "".join(ch if ch in "\n\t" or ch >= " " else f"\\x{ord(ch):02x}" for ch in text)
    return Text(cleaned)


def score_style(score: float) -> str:
    if score >= 6:
        return "bold black on green"
    if score >= 4:
        return "black on yellow"
    return "bold white on red"


class UserTurn(Static):
    DEFAULT_CSS = """
    UserTurn { margin: 1 0 0 0; padding: 0 1; color: $text; background: $boost; }
    """

    def __init__(self, text: str, **kwargs: Any) -> None:
        super().__init__(Text.assemble(("あなた ", "bold cyan"), plain(text)), markup=False,
                         **kwargs)


class ReplyText(Static):
    """The streamed reply: chunks are appended in batches (the app flushes every ~30 ms),
    one re-render of this widget per batch, not one per token."""

    def __init__(self, speaker: str, **kwargs: Any) -> None:
        super().__init__("", markup=False, **kwargs)
        self.speaker = speaker
        self.text = ""
        self.state = "streaming"
        self._render_text()

    def append(self, chunk: str) -> None:
        self.text += chunk
        self._render_text()

    def finish(self, state: str) -> None:
        self.state = state
        self._render_text()

    def _render_text(self) -> None:
        tag = {"streaming": " …", "incomplete": " [中断]", "error": " [エラー]"}.get(self.state, "")
        self.update(Text.assemble((f"{self.speaker} ", "bold magenta"), plain(self.text),
                                  (tag, "dim italic")))


class Badges(Horizontal):
    """One badge per judge criterion (pending → score or failure) and per style check."""

    DEFAULT_CSS = """
    Badges { height: auto; width: 1fr; }
    Badges > Static { width: auto; margin: 0 1 0 0; }
    """

    def __init__(self, criteria: list[str], note: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.criteria = criteria
        self.note = note
        self.verdicts: dict[str, Any] = {}

    def compose(self):
        for name in self.criteria:
            yield Static(Text(f" {name} … ", style="dim"), id=f"judge-{name}", markup=False)
        if self.note:
            yield Static(Text(self.note, style="dim italic"), classes="note", markup=False)
        yield Static("", id="style", markup=False)

    def set_verdict(self, verdict: Any) -> None:
        self.verdicts[verdict.criterion] = verdict
        try:
            badge = self.query_one(f"#judge-{verdict.criterion}", Static)
        except Exception:
            return  # a criterion the screen was not told about
        if verdict.status == "ok" and verdict.score is not None:
            shown = (f"{verdict.weighted_score:.1f}" if verdict.weighted_score is not None
                     else str(verdict.score))
            badge.update(Text(f" {verdict.criterion} {shown} ",
                              style=score_style(verdict.weighted_score or verdict.score)))
        else:
            why = verdict.error_kind or verdict.status
            badge.update(Text(f" {verdict.criterion} ✗ {why} ", style="bold red"))

    def set_style(self, checks: list[StyleCheck]) -> None:
        parts = []
        for c in checks:
            parts.append((f" {c.name}{'✓' if c.ok else '✗'}", "green" if c.ok else "red"))
        self.query_one("#style", Static).update(Text.assemble(*parts))


class Exchange(Vertical):
    """One user question, the reply and its badges; selectable (focus) for the side panel."""

    can_focus = True
    DEFAULT_CSS = """
    Exchange { height: auto; }
    Exchange:focus { background: $boost; }
    """

    def __init__(self, question: str, speaker: str, criteria: list[str],
                 note: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.question = question
        self.user = UserTurn(question)
        self.reply = ReplyText(speaker)
        self.badges = Badges(criteria, note)
        self.message: dict[str, Any] | None = None  # the stored assistant row, when done
        self.hits: list[Any] = []

    def compose(self):
        yield self.user
        yield self.reply
        yield self.badges
