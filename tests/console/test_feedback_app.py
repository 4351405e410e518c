"""Pilot tests of feedback in the chat console (issue 16): regenerate a reply and browse its
alternatives (the one shown continues the chat), edit a reply and continue from the edit,
rate a reply beside the judge's badge, blind A/B votes, and the keys that reach them."""

from __future__ import annotations

import json

import pytest

from console.app import KyaraApp
from console.widgets import RatePanel, ReplyEditor
from pipelines import feedback
from pipelines.chat import ChatSession
from pipelines.pool import BackendPool
from pipelines.workspace import Workspace
from store import Store
from tests.conftest import CONFIGS
from tests.console.test_chat_app import (
    ScriptedBackend,
    ScriptedJudge,
    make_app,
    type_and_send,
    wait_idle,
)


@pytest.fixture
def ws():
    return Workspace.load(CONFIGS)


@pytest.fixture
def store(tmp_path):
    return Store.open(tmp_path / "store")


class RecordingBackend(ScriptedBackend):
    """Also keeps the generation options of every request."""

    def __init__(self, replies=None):
        super().__init__(replies)
        self.options = []

    def stream(self, messages, options):
        self.options.append(options)
        return super().stream(messages, options)


def turns(messages):
    """The conversation part of a request (the system prompt left out)."""
    return [(m["role"], m["content"]) for m in messages if m["role"] != "system"]


async def settle(pilot, app):
    """The thread workers that store feedback have finished and their messages arrived."""
    await app.workers.wait_for_complete()
    await pilot.pause()


def screen_text(screen) -> str:
    return "\n".join(str(w.render()) for w in screen.query("Static"))


async def test_regenerate_browse_and_the_chosen_one_continues(ws, store, tmp_path):
    backend = RecordingBackend([["一回目ですわ。"], ["二回目ですわ。"], ["三回目ですわ。"],
                                ["続きですわ。"]])
    app = make_app(ws, store, backend, None, tmp_path)
    async with app.run_test(size=(80, 24)) as pilot:
        await type_and_send(pilot, "好きな花は？")
        await wait_idle(pilot, app)
        exchange = app.exchanges[0]
        original = exchange.message
        for _ in range(2):
            await pilot.press("ctrl+n")  # the last reply is selected while typing
            await wait_idle(pilot, app)
        assert exchange.reply.text == "三回目ですわ。"
        assert "‹3/3›" in str(exchange.reply.render())
        # sampling on, a new seed each time, and the question the original answered
        first, *again = backend.options
        assert all(o.temperature == ws.variant("gemma3-270m").generation.temperature
                   and o.seed is not None for o in again)
        assert again[0].seed != again[1].seed
        assert turns(backend.seen[1]) == turns(backend.seen[2]) == [("user", "好きな花は？")]
        rows = [m for m in app.session.messages() if m["role"] == "assistant"]
        assert len(rows) == 3 and {r["seq"] for r in rows} == {original["seq"]}
        # browse back with ←: shown is chosen
        exchange.focus()
        await pilot.press("left")
        await pilot.press("left")
        await settle(pilot, app)
        assert exchange.reply.text == "一回目ですわ。"
        assert "‹1/3›" in str(exchange.reply.render())
        await pilot.press("right")
        await settle(pilot, app)
        assert exchange.reply.text == "二回目ですわ。"
        assert turns(app.session.history()) == [("user", "好きな花は？"),
                                                ("assistant", "二回目ですわ。")]
        assert feedback.chosen_id(store, original["id"]) == exchange.message["id"]
        # the next turn is sent with the chosen reply only
        app.query_one("#prompt").focus()
        await type_and_send(pilot, "どうして？")
        await wait_idle(pilot, app)
        assert turns(backend.seen[-1]) == [("user", "好きな花は？"),
                                           ("assistant", "二回目ですわ。"),
                                           ("user", "どうして？")]
    # reopened: the chosen reply, with its place among the alternatives
    resumed = ChatSession.resume(store, app.session.session_id, persona=app.session.persona,
                                 variant=app.session.variant, backend=ScriptedBackend())
    app2 = KyaraApp(resumed, variants={}, backend_loader=None, export_dir=tmp_path)
    async with app2.run_test(size=(80, 24)) as pilot:
        assert [e.reply.text for e in app2.exchanges] == ["二回目ですわ。", "続きですわ。"]
        assert "‹2/3›" in str(app2.exchanges[0].reply.render())


async def test_edit_a_reply_and_continue_from_the_edit(ws, store, tmp_path):
    backend = ScriptedBackend([["元の答えですわ。"], ["続きですわ。"]])
    app = make_app(ws, store, backend, None, tmp_path)
    async with app.run_test(size=(80, 24)) as pilot:
        await type_and_send(pilot, "趣味は？")
        await wait_idle(pilot, app)
        exchange = app.exchanges[0]
        original = exchange.message
        app.query_one("#prompt").value = "書きかけの質問"
        await pilot.press("f2")
        await pilot.pause()
        editor = app.query_one(ReplyEditor)
        assert editor.text == "元の答えですわ。" and app.focused is editor.area
        editor.area.text = "読書と観劇ですわ。"
        await pilot.press("f2")  # pressed again: saves
        await settle(pilot, app)
        assert not app.query(ReplyEditor)
        assert exchange.reply.text == "読書と観劇ですわ。"
        assert "[編集済]" in str(exchange.reply.render())
        assert app.query_one("#prompt").value == "書きかけの質問"  # nothing typed is lost
        edits = feedback.edits_of(store, [original["id"]])
        assert [(e["original_text"], e["edited_text"]) for e in edits] == [
            ("元の答えですわ。", "読書と観劇ですわ。")]
        assert store.get("messages", original["id"])["content"] == "元の答えですわ。"
        app.query_one("#prompt").value = ""
        await type_and_send(pilot, "いいですね")
        await wait_idle(pilot, app)
        assert ("assistant", "読書と観劇ですわ。") in turns(backend.seen[-1])
        assert ("assistant", "元の答えですわ。") not in turns(backend.seen[-1])
        # Escape closes an editor without storing anything
        await pilot.press("f2")
        await pilot.pause()
        await pilot.press("escape")
        await pilot.pause()
        assert not app.query(ReplyEditor) and len(feedback.edits_of(store)) == 1


async def test_rate_a_reply_shows_the_gap_to_the_judge(ws, store, tmp_path):
    app = make_app(ws, store, ScriptedBackend([["ごきげんようですわ。"]]), ScriptedJudge(),
                   tmp_path)
    async with app.run_test(size=(80, 24)) as pilot:
        await type_and_send(pilot, "こんにちは")
        await wait_idle(pilot, app)
        exchange = app.exchanges[0]
        for _ in range(100):
            await pilot.pause(0.02)
            if len(exchange.badges.verdicts) == 2:
                break
        app.query_one("#prompt").value = "次の質問"
        await pilot.press("ctrl+l")
        await pilot.pause()
        panel = app.query_one(RatePanel)
        assert app.focused is panel
        assert "personality" in str(panel.render()) and "judge 6" in str(panel.render())
        await pilot.press("3", "5", "u", "enter")  # personality 3, style 5, thumbs up
        await settle(pilot, app)
        assert not app.query(RatePanel)
        shown = str(exchange.badges.render())
        assert "personality judge 6 · you 3 (−3)" in shown
        assert "style judge ✗ rate_limited · you 5" in shown and "you 👍" in shown
        assert feedback.labels_for(store, [exchange.message["id"]]) == {
            exchange.message["id"]: {"personality": 3, "style": 5, "thumbs": 2}}
        assert app.query_one("#prompt").value == "次の質問"
        assert app.focused is app.query_one("#prompt")
        # rated again to agree with the judge: no gap shown
        await pilot.press("ctrl+l")
        await pilot.pause()
        await pilot.press("6", "enter")
        await settle(pilot, app)
        shown = str(exchange.badges.render())
        assert "personality judge 6 · you 6 " in shown and "(" not in shown.split("style")[0]


def blind_app(ws, store, tmp_path, judge=None):
    variants = {n: ws.variant(n) for n in ("gemma3-270m", "gemma-2-2b-jpn-it")}
    session = ChatSession(store=store, persona=ws.persona("ayane"),
                          variant=variants["gemma3-270m"], backend=ScriptedBackend())

    def loader(v):
        return ScriptedBackend([["答えの一つですわ。"]] * 4)

    app = KyaraApp(session, variants=variants, backend_loader=loader, judge=judge,
                   export_dir=tmp_path, compare_spec=["gemma3-270m", "gemma-2-2b-jpn-it"])
    app.pool = BackendPool(loader)
    return app


async def ask_blind(pilot, app, question):
    from console.blind import BlindScreen

    await pilot.press("ctrl+b")
    await pilot.pause()
    screen = app.screen
    assert isinstance(screen, BlindScreen)
    screen.query_one("#compare-prompt").value = question
    await pilot.press("enter")
    for _ in range(300):
        await pilot.pause(0.02)
        if screen.pending is not None:
            return screen
    raise AssertionError("the blind round never asked for a vote")


async def test_blind_vote_is_stored_names_hidden_until_then(ws, store, tmp_path):
    app = blind_app(ws, store, tmp_path, judge=ScriptedJudge())
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await ask_blind(pilot, app, "好きな季節は？")
        before = screen_text(screen)
        assert "gemma" not in before  # no name anywhere on screen
        assert [c.label for c in screen.rounds[0]] == ["A", "B"]
        assert all(not c.badges.verdicts for c in screen.rounds[0])  # no judge hint either
        round_ = screen.blind[0]
        # the seed and the sides are recorded with both replies
        replies = [c.message for c in round_.columns]
        tags = [json.loads(r["options_json"])["blind"] for r in replies]
        assert tags[0] == tags[1] == {"seed": round_.seed,
                                      "A": round_.combos[0].variant.name,
                                      "B": round_.combos[1].variant.name}
        assert [r["variant"] for r in replies] == [c.variant.name for c in round_.combos]
        await pilot.press("b")
        await settle(pilot, app)
        [pref] = feedback.preference_rows(store, "human")
        assert pref["chosen_id"] == replies[1]["id"] and pref["rejected_id"] == replies[0]["id"]
        assert not pref["tie"]
        assert json.loads(pref["variants_json"]) == {"chosen": round_.combos[1].variant.name,
                                                     "rejected": round_.combos[0].variant.name}
        assert json.loads(pref["prompt_json"]) == [{"role": "user", "content": "好きな季節は？"}]
        after = screen_text(screen)
        assert "gemma3-270m" in after and "gemma-2-2b-jpn-it" in after
        assert screen.rounds[0][1].label.startswith("B ✓ · ")  # your choice
        assert screen.rounds[0][0].label.startswith("A · ")
        for _ in range(100):  # the judge scores once the names are out
            await pilot.pause(0.02)
            if all(len(c.badges.verdicts) == 2 for c in screen.rounds[0]):
                break
        assert "personality 5.7" in str(screen.rounds[0][0].badges.render())
        # the next round: a tie
        screen.query_one("#compare-prompt").value = "好きな色は？"
        screen.query_one("#compare-prompt").focus()
        await pilot.press("enter")
        for _ in range(300):
            await pilot.pause(0.02)
            if screen.pending is not None:
                break
        await pilot.press("t")
        await settle(pilot, app)
        assert [p["tie"] for p in feedback.preference_rows(store, "human")] == [False, True]


async def test_vote_on_a_deleted_reply_stores_nothing(ws, store, tmp_path):
    app = blind_app(ws, store, tmp_path)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await ask_blind(pilot, app, "好きな本は？")
        store.delete("messages", [screen.blind[0].columns[0].message["id"]])
        await pilot.press("a")
        await settle(pilot, app)
        assert feedback.preference_rows(store) == []
        notes = [n.message for n in app._notifications]
        assert any("does not exist" in n and "\n" not in n for n in notes)
        assert "not stored" in screen_text(screen)
        assert app.is_running


async def test_new_keys_are_remappable_and_in_the_palette(ws, store, tmp_path):
    session = ChatSession(store=store, persona=ws.persona("ayane"),
                          variant=ws.variant("gemma3-270m"),
                          backend=ScriptedBackend([["はいですわ。"]]))
    app = KyaraApp(session, variants={}, backend_loader=None, export_dir=tmp_path,
                   keymap={"rate_reply": "ctrl+f"}, rate_criteria=["personality"])
    async with app.run_test(size=(80, 24)) as pilot:
        titles = [c.title for c in app.get_system_commands(app.screen)]
        for title in ("Reply: regenerate", "Reply: previous alternative",
                      "Reply: next alternative", "Reply: edit", "Reply: rate", "Blind A/B"):
            assert title in titles
        await type_and_send(pilot, "こんにちは")
        await wait_idle(pilot, app)
        await pilot.press("ctrl+l")
        await pilot.pause()
        assert not app.query(RatePanel)  # the old key no longer rates
        await pilot.press("ctrl+f")
        await pilot.pause()
        panel = app.query_one(RatePanel)
        await pilot.press("4", "d", "enter")  # no judge: the configured criteria, rated
        await settle(pilot, app)
        assert feedback.labels_for(store, [panel.message_id])[panel.message_id] == {
            "personality": 4, "thumbs": 1}
        assert "personality you 4" in str(app.exchanges[0].badges.render())


async def test_rating_a_deleted_reply_keeps_the_panel_and_stores_nothing(ws, store,
                                                                       tmp_path):
    app = make_app(ws, store, ScriptedBackend([["はいですわ。"]]), None, tmp_path)
    app._rate_criteria = ["personality"]
    async with app.run_test(size=(80, 24)) as pilot:
        await type_and_send(pilot, "こんにちは")
        await wait_idle(pilot, app)
        await pilot.press("ctrl+l")
        await pilot.pause()
        store.delete("messages", [app.exchanges[0].message["id"]])
        await pilot.press("2", "enter")
        await settle(pilot, app)
        notes = [n.message for n in app._notifications]
        assert any("does not exist" in n and "\n" not in n for n in notes)
        assert app.query(RatePanel)  # what you entered is still there to retry or close
        assert store.rows("labels") == []
        assert app.is_running


async def test_a_selected_reply_puts_its_keys_first_in_the_footer(ws, store, tmp_path):
    """At 80 columns the footer cannot hold every key: while a reply is selected, the keys
    that act on it come first (as the keymap has them); one press still acts once."""
    session = ChatSession(store=store, persona=ws.persona("ayane"),
                          variant=ws.variant("gemma3-270m"),
                          backend=ScriptedBackend([["はいですわ。"], ["いいえですわ。"]]))
    app = KyaraApp(session, variants={}, backend_loader=None, export_dir=tmp_path,
                   keymap={"edit_reply": "f4"})
    async with app.run_test(size=(80, 24)) as pilot:
        await type_and_send(pilot, "こんにちは")
        await wait_idle(pilot, app)
        await pilot.press("shift+tab")
        await pilot.pause()
        assert app.focused is app.exchanges[0]
        footer = "\n".join(strip.text for strip in
                           app.screen._compositor.render_strips()).splitlines()[-1]
        for shown in ("← Prev alt", "→ Next alt", "^n Regenerate", "f4 Edit", "^l Rate"):
            assert shown in footer, footer
        original = app.exchanges[0].message["id"]
        await pilot.press("ctrl+n")  # regenerates once: one alternative more, not two
        await wait_idle(pilot, app)
        await settle(pilot, app)
        assert [m["content"] for m in feedback.alternatives(store, original)] == [
            "はいですわ。", "いいえですわ。"]
