"""Blind A/B: one question to two combinations whose names are hidden and whose sides are
shuffled until you vote A, B or tie; then the names, and the judge's verdicts, are shown.

Each round's shuffle comes from a seed drawn for it; the seed and which combination was on
which side are recorded with both replies (their `options_json`, key "blind"). The vote is
a human preference in the store (pipelines.feedback.record_preference, source "human"); a
vote on a reply deleted meanwhile stores nothing and says so in one line."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.message import Message
from textual.widgets import Footer, Input, Static

from console.compare import Column, ColumnDone, CompareScreen
from pipelines.chat import Combo, default_combos
from pipelines.inference.base import BackendError

SIDES = ("A", "B")


def spec(combo: Combo) -> str:
    """A combination as the compare setting writes it: `name` or `name+rag`."""
    return combo.variant.name + ("+rag" if combo.rag else "")


def blind_pair(variants: dict[str, Any], current: Any, rag_available: bool,
               wanted: list[str] | None = None, *, home: Path | None = None) -> list[Combo]:
    """The two combinations to compare blind: the first two of the configured compare set;
    else the current variant against the first fine-tuned one, else retrieval off against
    on. BackendError (one line) when there are not two."""
    combos = default_combos(variants, current, rag_available, wanted, home=home)
    if not wanted:
        others = [c for c in combos if c.variant.name != current.name and not c.rag]
        if others:
            combos = [combos[0], others[0]]
    if len(combos) < 2:
        raise BackendError("blind A/B needs two combinations: set compare: in "
                           "configs/kyara.yaml, add a fine-tuned variant or index the persona")
    return combos[:2]


@dataclass
class BlindRound:
    question: str
    columns: list[Column]
    combos: list[Combo]  # in the order shown: A, B
    seed: int
    note: Static
    vote: str | None = None  # "A", "B", "tie", or None before the vote


@dataclass
class VoteStored(Message):
    round: int
    vote: str
    error: str | None  # why nothing was stored


class BlindScreen(CompareScreen):
    BINDINGS = [
        Binding("a", "vote('A')", "A is better", id="vote_a"),
        Binding("b", "vote('B')", "B is better", id="vote_b"),
        Binding("t", "vote('tie')", "Tie", id="vote_tie"),
    ]

    def __init__(self, session: Any, combos: list[Combo], *, judge: Any = None,
                 keys: dict[str, str] | None = None, seed: int | None = None) -> None:
        # the judge scores only after the vote: its badges would be a hint
        super().__init__(session, combos, judge=None)
        self.pair = list(combos)
        self.verdict_judge = judge
        self.keys = {"vote_a": "a", "vote_b": "b", "vote_tie": "t", **(keys or {})}
        self.seeds = random.Random(seed)  # each round's seed comes from here
        self.blind: list[BlindRound] = []
        self.pending: int | None = None  # the round waiting for your vote

    def compose(self) -> ComposeResult:
        yield Static(Text("blind A/B: two combinations, names hidden until you vote"),
                     id="compare-status", markup=False)
        yield VerticalScroll(id="rounds")
        yield Input(placeholder="質問を入力 (Enter): 名前を伏せて二つの答えを比べます",
                    id="compare-prompt")
        yield Footer()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "vote":
            return self.pending is not None  # the vote keys exist once both replies are in
        return True

    def start_round(self, text: str) -> None:
        seed = self.seeds.randrange(2**31)
        order = list(self.pair)
        random.Random(seed).shuffle(order)
        self.combos = order  # what run_compare asks, in side order
        self.session.tags = {"blind": {"seed": seed, "A": spec(order[0]),
                                       "B": spec(order[1])}}
        columns = self._new_round(text, list(SIDES))
        note = Static(Text("replies coming…", style="dim"), classes="vote-note", markup=False)
        self.query_one("#rounds", VerticalScroll).mount(note)
        self.blind.append(BlindRound(text, columns, order, seed, note))
        # nothing can be typed until the vote: the vote keys are plain letters
        self.query_one("#compare-prompt", Input).disabled = True
        self.run_compare(len(self.rounds) - 1, text)

    def on_column_done(self, event: ColumnDone) -> None:
        event.prevent_default()  # the compare screen's handler runs first, here
        super().on_column_done(event)
        if self.busy or event.round >= len(self.blind):
            return
        round_ = self.blind[event.round]
        if round_.vote is None and self.pending is None:
            self.pending = event.round
            k = self.keys
            round_.note.update(Text(f"which is better?  {k['vote_a']}: A  ·  {k['vote_b']}: B"
                                    f"  ·  {k['vote_tie']}: tie", style="bold"))
            self.refresh_bindings()
            self.query_one("#rounds", VerticalScroll).scroll_end(animate=False)

    def action_vote(self, vote: str) -> None:
        if self.pending is None:
            return
        index, self.pending = self.pending, None
        self.refresh_bindings()
        self.store_vote(index, vote)

    @work(thread=True, exit_on_error=False, group="vote", description="store the vote")
    def store_vote(self, index: int, vote: str) -> None:
        from pipelines.feedback import FeedbackError, record_preference

        round_ = self.blind[index]
        rows = [c.message for c in round_.columns]
        first = 1 if vote == "B" else 0  # the chosen side (A for a tie)
        chosen, rejected = rows[first], rows[1 - first]
        error = None
        try:
            if chosen is None or rejected is None:
                raise FeedbackError("no vote stored: one side has no reply")
            record_preference(
                self.session.store, prompt=[{"role": "user", "content": round_.question}],
                chosen=chosen, rejected=rejected, tie=vote == "tie", source="human",
                variants={"chosen": spec(round_.combos[first]),
                          "rejected": spec(round_.combos[1 - first])},
                rater="me", session_id=self.session.session_id,
                rendered_prompt=chosen.get("rendered_prompt"))
        except FeedbackError as exc:  # a reply deleted meanwhile, an empty side
            error = str(exc)
        self.post_message(VoteStored(index, vote, error))

    def on_vote_stored(self, event: VoteStored) -> None:
        round_ = self.blind[event.round]
        round_.vote = event.vote
        if event.error:
            self.app.notify(event.error, severity="error", markup=False, timeout=8)
        for side, column, combo in zip(SIDES, round_.columns, round_.combos, strict=True):
            mine = event.vote == side and not event.error
            column.set_label(f"{side}{' ✓' if mine else ''} · {combo.label}")
        a, b = round_.combos
        said = "tie" if event.vote == "tie" else event.vote
        round_.note.update(Text(f"you: {said} (not stored)" if event.error
                                else f"you: {said} (stored)",
                                style="bold red" if event.error else "bold green"))
        self.query_one("#compare-status", Static).update(
            Text(f"blind A/B: A = {a.label} | B = {b.label}"))
        prompt = self.query_one("#compare-prompt", Input)
        prompt.disabled = False
        prompt.focus()
        if self.verdict_judge is not None:
            for column in round_.columns:
                if column.message is not None and column.message["status"] == "complete":
                    self.judge_revealed(column, round_.question)

    @work(exit_on_error=False, group="judge", description="judge a compared reply")
    async def judge_revealed(self, column: Column, question: str) -> None:
        row = column.message
        column.badges.criteria = list(getattr(self.verdict_judge, "criteria", []) or [])
        async for verdict in self.verdict_judge.stream_verdicts(
                question=question, reply=row["content"], message_id=row["id"], history=[]):
            column.badges.set_verdict(verdict)
