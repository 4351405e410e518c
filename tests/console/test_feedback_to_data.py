"""Issue 16's loop end to end: what a person does in the console — a rating, an edit, a
swipe to another alternative, a blind vote — is what `kyara data export` writes and what
`kyara judge calibrate` compares the judge with."""

from __future__ import annotations

import json

from console.widgets import ReplyEditor
from pipelines.datasets import export
from pipelines.judge.calibrate import stored_labels
from tests.console.test_chat_app import ScriptedBackend, make_app, type_and_send, wait_idle
from tests.console.test_feedback_app import ask_blind, blind_app, settle, store, ws  # noqa: F401


async def test_console_feedback_reaches_the_exports_and_calibration(ws, store, tmp_path):  # noqa: F811
    backend = ScriptedBackend([["最初の答えですわ。"], ["別の答えですわ。"], ["紅茶ですわ。"]])
    app = make_app(ws, store, backend, None, tmp_path)
    app._rate_criteria = ["personality"]
    async with app.run_test(size=(80, 24)) as pilot:
        # a swipe: regenerate, then back to the first reply (shown is chosen)
        await type_and_send(pilot, "好きな花は？")
        await wait_idle(pilot, app)
        first = app.exchanges[0]
        await pilot.press("ctrl+n")
        await wait_idle(pilot, app)
        first.focus()
        await pilot.press("left")
        await settle(pilot, app)
        assert first.reply.text == "最初の答えですわ。"
        # a rating on it
        app.query_one("#prompt").focus()
        await pilot.press("ctrl+l")
        await pilot.pause()
        await pilot.press("6", "u", "enter")
        await settle(pilot, app)
        # an edit of the next reply
        await type_and_send(pilot, "好きな飲み物は？")
        await wait_idle(pilot, app)
        await pilot.press("f2")
        await pilot.pause()
        app.query_one(ReplyEditor).area.text = "ダージリンの紅茶ですわ。"
        await pilot.press("f2")
        await settle(pilot, app)
    # a blind vote
    blind = blind_app(ws, store, tmp_path)
    async with blind.run_test(size=(80, 24)) as pilot:
        await ask_blind(pilot, blind, "好きな季節は？")
        await pilot.press("a")
        await settle(pilot, blind)

    sft = export(store, "sft").rows
    replies = [row["messages"][-1]["content"] for row in sft]
    assert "最初の答えですわ。" in replies and "ダージリンの紅茶ですわ。" in replies
    assert "別の答えですわ。" not in replies and "紅茶ですわ。" not in replies  # not chosen
    rated = export(store, "sft", min_score=6).rows
    assert [row["messages"][-1]["content"] for row in rated] == ["最初の答えですわ。"]
    labels = export(store, "labels").rows
    assert {(r["criterion"], r["score"]) for r in labels} == {("personality", 6), ("thumbs", 2)}
    [pair] = export(store, "dpo").rows
    assert pair["prompt"] == [{"role": "user", "content": "好きな季節は？"}]
    assert pair["chosen"][-1]["role"] == "assistant" and pair["rejected"][-1]["role"] == "assistant"
    assert json.dumps(pair, ensure_ascii=False).count("human") >= 1  # where it came from
    # calibration: the console's rating is a labelled item the judge is compared with
    [stored] = stored_labels(store, "ayane", "personality")
    assert stored.row.score == 6 and stored.row.reply == "最初の答えですわ。"
    assert stored.interaction.question == "好きな花は？"
