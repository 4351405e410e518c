"""Transcript widgets. Every piece of text from a model, a persona file or a judge is shown
as rich `Text` (never parsed as markup): `[bold]`, `[@click=app.quit]` and escape sequences
appear literally and do nothing."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.containers import Vertical
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


class Badges(Static):
    """One badge per judge criterion (pending, then the score or why it failed) and one per
    style check, as one wrapping line of text (readable at 80 columns)."""

    DEFAULT_CSS = "Badges { height: auto; width: 1fr; }"

    def __init__(self, criteria: list[str], note: str | None = None, **kwargs: Any) -> None:
        super().__init__("", markup=False, **kwargs)
        self.criteria = criteria
        self.note = note
        self.verdicts: dict[str, Any] = {}
        self.checks: list[StyleCheck] = []
        self._render_badges()

    def badge(self, criterion: str) -> Text:
        verdict = self.verdicts.get(criterion)
        if verdict is None:
            return Text(f" {criterion} … ", style="dim")
        if verdict.status == "ok" and verdict.score is not None:
            weighted = verdict.weighted_score
            shown = f"{weighted:.1f}" if weighted is not None else str(verdict.score)
            return Text(f" {criterion} {shown} ", style=score_style(weighted or verdict.score))
        return Text(f" {criterion} ✗ {verdict.error_kind or verdict.status} ", style="bold red")

    def set_verdict(self, verdict: Any) -> None:
        self.verdicts[verdict.criterion] = verdict
        self._render_badges()

    def set_style(self, checks: list[StyleCheck]) -> None:
        self.checks = list(checks)
        self._render_badges()

    def _render_badges(self) -> None:
        text = Text()
        for name in self.criteria:
            text.append_text(self.badge(name))
            text.append(" ")
        if self.note:
            text.append(self.note + " ", style="dim italic")
        for c in self.checks:
            text.append(f"{c.name}{'✓' if c.ok else '✗'} ", style="green" if c.ok else "red")
        self.update(text)


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
