"""Transcript widgets. Every piece of text from a model, a persona file or a judge is shown
as rich `Text` (never parsed as markup): `[bold]`, `[@click=app.quit]` and escape sequences
appear literally and do nothing."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rich.text import Text
from textual.binding import Binding
from textual.containers import Vertical
from textual.message import Message
from textual.widgets import Static, TextArea

from console.text import visible
from pipelines.style import StyleCheck

THUMBS, THUMBS_DOWN, THUMBS_UP = "thumbs", 1, 2  # as pipelines.feedback stores them


def plain(text: str) -> Text:
    """Untrusted text as a renderable: no markup, control characters (C0, DEL, C1) made
    visible (console.text)."""
    return Text(visible(text))


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
    one re-render of this widget per batch, not one per token. `counter` ("2/3") says which
    of the reply's alternatives is shown."""

    def __init__(self, speaker: str, **kwargs: Any) -> None:
        super().__init__("", markup=False, **kwargs)
        self.speaker = speaker
        self.text = ""
        self.state = "streaming"
        self.counter: str | None = None
        self.edited = False
        self._render_text()

    def append(self, chunk: str) -> None:
        self.text += chunk
        self._render_text()

    def finish(self, state: str) -> None:
        self.state = state
        self._render_text()

    def show(self, text: str, state: str, counter: str | None = None,
             edited: bool = False) -> None:
        """Replace the reply shown (another alternative, an edit, a new generation)."""
        self.text, self.state, self.counter, self.edited = text, state, counter, edited
        self._render_text()

    def _render_text(self) -> None:
        tag = {"streaming": " …", "incomplete": " [中断]", "error": " [エラー]"}.get(self.state, "")
        if self.edited:
            tag += " [編集済]"
        counter = (f"‹{self.counter}› ", "bold cyan") if self.counter else ("", "")
        self.update(Text.assemble((f"{self.speaker} ", "bold magenta"), counter,
                                  plain(self.text), (tag, "dim italic")))


class Badges(Static):
    """One badge per judge criterion (pending, then the score or why it failed) and one per
    style check, as one wrapping line of text (readable at 80 columns)."""

    DEFAULT_CSS = "Badges { height: auto; width: 1fr; }"

    def __init__(self, criteria: list[str], note: str | None = None, **kwargs: Any) -> None:
        super().__init__("", markup=False, **kwargs)
        self.criteria = criteria
        self.note = note
        self.verdicts: dict[str, Any] = {}
        self.labels: dict[str, int] = {}  # your ratings: criterion (or "thumbs") -> score
        self.checks: list[StyleCheck] = []
        self._render_badges()

    def badge(self, criterion: str) -> Text:
        verdict = self.verdicts.get(criterion)
        label = self.labels.get(criterion)
        if label is not None:
            return self.rated_badge(criterion, verdict, label)
        if verdict is None:
            return Text(f" {criterion} … ", style="dim")
        if verdict.status == "ok" and verdict.score is not None:
            weighted = verdict.weighted_score
            shown = f"{weighted:.1f}" if weighted is not None else str(verdict.score)
            return Text(f" {criterion} {shown} ", style=score_style(weighted or verdict.score))
        return Text(f" {criterion} ✗ {verdict.error_kind or verdict.status} ", style="bold red")

    @staticmethod
    def rated_badge(criterion: str, verdict: Any, label: int) -> Text:
        """Your score beside the judge's, with the gap when they differ:
        "personality judge 5 · you 3 (−2)"."""
        you = Text(f"you {label} ", style=score_style(label))
        if verdict is not None and verdict.status == "ok" and verdict.score is not None:
            gap = label - verdict.score
            if gap:
                you.append(f"({'+' if gap > 0 else '−'}{abs(gap)}) ", style="bold")
            return Text.assemble((f" {criterion} judge {verdict.score} · ",
                                  score_style(verdict.score)), you)
        if verdict is not None:  # the judge failed on it: say so beside your score
            return Text.assemble((f" {criterion} judge ✗ {verdict.error_kind or verdict.status}"
                                  " · ", "bold red"), you)
        return Text.assemble((f" {criterion} ", "bold"), you)

    def set_verdict(self, verdict: Any) -> None:
        self.verdicts[verdict.criterion] = verdict
        self._render_badges()

    def set_style(self, checks: list[StyleCheck]) -> None:
        self.checks = list(checks)
        self._render_badges()

    def set_labels(self, labels: dict[str, int]) -> None:
        self.labels.update(labels)
        self._render_badges()

    def state(self) -> dict[str, Any]:
        """What this reply's badges know (kept while another alternative is shown)."""
        return {"verdicts": dict(self.verdicts), "labels": dict(self.labels)}

    def restore(self, state: dict[str, Any] | None) -> None:
        self.verdicts = dict((state or {}).get("verdicts", {}))
        self.labels = dict((state or {}).get("labels", {}))
        self.checks = []
        self._render_badges()

    def _render_badges(self) -> None:
        text = Text()
        for name in self.criteria:
            text.append_text(self.badge(name))
            text.append(" ")
        for name, score in self.labels.items():  # rated on a criterion no judge scores here
            if name not in self.criteria and name != THUMBS:
                text.append_text(self.rated_badge(name, None, score))
                text.append(" ")
        if THUMBS in self.labels:
            up = self.labels[THUMBS] == THUMBS_UP
            text.append(" you 👍 " if up else " you 👎 ",
                        style="bold black on green" if up else "bold white on red")
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
    # the app does the browsing (it stores the choice); these keys act on the reply focused
    BINDINGS = [
        Binding("left", "app.alternative(-1)", "Prev alt", id="prev_alternative"),
        Binding("right", "app.alternative(1)", "Next alt", id="next_alternative"),
        # the app's priority bindings act from anywhere; listed here too so that the footer
        # shows them first while a reply is selected (same ids: one keymap entry each)
        Binding("ctrl+n", "app.regenerate", "Regenerate", id="regenerate"),
        Binding("f2", "app.edit_reply", "Edit", id="edit_reply"),
        Binding("ctrl+l", "app.rate_reply", "Rate", id="rate_reply"),
    ]

    def __init__(self, question: str, speaker: str, criteria: list[str],
                 note: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.question = question
        self.user = UserTurn(question)
        self.reply = ReplyText(speaker)
        self.badges = Badges(criteria, note)
        self.message: dict[str, Any] | None = None  # the stored assistant row, when done
        self.hits: list[Any] = []
        # the reply's group: the original, its regenerations and edits (position order)
        self.alternatives: list[dict[str, Any]] = []
        self._kept: dict[str, dict[str, Any]] = {}  # message id -> its badges' state

    def compose(self):
        yield self.user
        yield self.reply
        yield self.badges

    @property
    def position(self) -> int:
        ids = [r["id"] for r in self.alternatives]
        return ids.index(self.message["id"]) if self.message and self.message["id"] in ids \
            else -1

    def show(self, row: dict[str, Any], alternatives: list[dict[str, Any]] | None = None
             ) -> None:
        """Show `row` (one of the reply's alternatives); its badges come back as they were."""
        self.keep()
        if alternatives is not None:
            self.alternatives = alternatives
        self.message = row
        counter = (f"{self.position + 1}/{len(self.alternatives)}"
                   if len(self.alternatives) > 1 and self.position >= 0 else None)
        edited = '"edit_of"' in (row.get("options_json") or "")
        self.reply.show(row["content"], row["status"], counter, edited)
        self.badges.restore(self._kept.get(row["id"]))

    def keep(self) -> None:
        if self.message is not None:
            self._kept[self.message["id"]] = self.badges.state()

    def begin_again(self) -> None:
        """A new alternative streams in place of the one shown."""
        self.keep()
        count = max(len(self.alternatives), 1) + 1
        self.reply.show("", "streaming", f"{count}/{count}")
        self.badges.restore(None)

    def keep_labels(self, message_id: str, labels: dict[str, int]) -> None:
        """Ratings of an alternative not shown now: shown when it is."""
        kept = self._kept.setdefault(message_id, {"verdicts": {}, "labels": {}})
        kept["labels"].update(labels)

    def set_verdict(self, message_id: str, verdict: Any) -> None:
        """A verdict on one of the alternatives: shown if it is the one shown, kept if not."""
        if self.message is not None and self.message["id"] == message_id:
            self.badges.set_verdict(verdict)
        else:
            kept = self._kept.setdefault(message_id, {"verdicts": {}, "labels": {}})
            kept["verdicts"][verdict.criterion] = verdict


class RatePanel(Static):
    """Your rating of one reply: 1–7 on each criterion and a thumbs up / down. Digits score
    the highlighted criterion (then move to the next), Enter saves, Escape closes."""

    can_focus = True
    DEFAULT_CSS = """
    RatePanel { height: auto; border: round $accent; padding: 0 1; }
    RatePanel:focus { border: round $success; }
    """
    BINDINGS = [
        Binding("up", "move(-1)", "Up", show=False),
        Binding("down", "move(1)", "Down", show=False),
        *[Binding(str(n), f"score({n})", str(n), show=False) for n in range(1, 8)],
        Binding("u", f"thumbs({THUMBS_UP})", "👍", id="thumbs_up"),
        Binding("d", f"thumbs({THUMBS_DOWN})", "👎", id="thumbs_down"),
        Binding("enter", "save", "Save rating", id="save_rating"),
    ]

    @dataclass
    class Saved(Message):
        panel: RatePanel
        labels: dict[str, int]  # what changed

    def __init__(self, exchange: Exchange, criteria: list[str], keys: str, **kwargs: Any
                 ) -> None:
        super().__init__("", markup=False, **kwargs)
        self.exchange = exchange
        self.message_id = exchange.message["id"] if exchange.message else ""
        self.criteria = list(criteria)
        self.keys = keys  # the thumbs keys, as the keymap has them
        self.before = dict(exchange.badges.labels)
        self.values = dict(self.before)
        self.row = 0
        self._render_panel()

    def _render_panel(self) -> None:
        text = Text()
        text.append("rate this reply: ", style="bold")
        text.append(f"1–7 per criterion (↑↓ moves), {self.keys}, Enter saves, "
                    "Escape closes\n", style="dim")
        width = max((len(c) for c in self.criteria + [THUMBS]), default=6)
        for index, name in enumerate(self.criteria):
            mark = "›" if index == self.row else " "
            score = self.values.get(name)
            text.append(f"{mark} {name:<{width}}  ", style="bold" if mark == "›" else "")
            text.append(str(score) if score else "·", style=score_style(score) if score
                        else "dim")
            verdict = self.exchange.badges.verdicts.get(name)
            if verdict is not None and verdict.status == "ok" and verdict.score is not None:
                text.append(f"   judge {verdict.score}", style="dim")
            text.append("\n")
        thumbs = self.values.get(THUMBS)
        text.append(f"  {THUMBS:<{width}}  ")
        text.append({THUMBS_UP: "👍", THUMBS_DOWN: "👎"}.get(thumbs or 0, "·"))
        self.update(text)

    def action_move(self, step: int) -> None:
        if self.criteria:
            self.row = (self.row + step) % len(self.criteria)
            self._render_panel()

    def action_score(self, score: int) -> None:
        if not self.criteria:
            return
        self.values[self.criteria[self.row]] = score
        self.row = min(self.row + 1, len(self.criteria) - 1)
        self._render_panel()

    def action_thumbs(self, value: int) -> None:
        self.values[THUMBS] = value
        self._render_panel()

    def action_save(self) -> None:
        changed = {k: v for k, v in self.values.items() if self.before.get(k) != v}
        self.post_message(self.Saved(self, changed))


class ReplyEditor(Vertical):
    """A small editor on one reply; what it saves continues the conversation (the original
    is kept)."""

    DEFAULT_CSS = """
    ReplyEditor { height: auto; border: round $accent; padding: 0 1; }
    ReplyEditor > TextArea { height: 6; }
    ReplyEditor > .hint { color: $text-muted; }
    """

    def __init__(self, exchange: Exchange, hint: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.exchange = exchange
        self.message_id = exchange.message["id"] if exchange.message else ""
        self.hint = hint
        self.area = TextArea(exchange.reply.text, soft_wrap=True, id="reply-editor")

    def compose(self):
        yield Static(Text(self.hint), classes="hint", markup=False)
        yield self.area

    def on_mount(self) -> None:
        self.area.focus()

    @property
    def text(self) -> str:
        return self.area.text
