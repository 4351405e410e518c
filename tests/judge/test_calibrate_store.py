"""Calibration from the labels given in the console (the store's labels table) as well as
calibration.jsonl: per criterion, with counts, and the console's label updated."""

from __future__ import annotations

import os

import pytest
from scripted_judge_server import answer
from typer.testing import CliRunner

from console.cli import app
from pipelines import feedback as fb
from pipelines.judge import calibrate, calibration_status
from pipelines.judge.calibrate import stored_labels
from pipelines.workspace import Workspace
from store import Store, new_id, utcnow


def labelled_chat(store, persona="ayane", replies=("はい、そうですわ。", "違いますの。",
                                                    "舞台が好きです。")):
    """A chat of `persona`: one exchange per reply, in order."""
    sid = new_id()
    store.upsert("sessions", [{"id": sid, "persona": persona, "variant": "v1"}])
    ids = []
    for k, text in enumerate(replies):
        now = utcnow()
        store.upsert("messages", [
            {"id": new_id(), "session_id": sid, "seq": 2 * k, "role": "user",
             "content": f"質問{k}", "created_at": now},
            {"id": (rid := new_id()), "session_id": sid, "seq": 2 * k + 1,
             "role": "assistant", "content": text, "created_at": now}])
        ids.append(rid)
    return ids


def score_by_reply(scores):
    """A judge that gives each reply the score in `scores` (by reply text)."""
    def respond(request):
        block = request.prompt.rsplit("[Interactions]", 1)[1]
        for text, score in scores.items():
            if f"[assistant] {text}\n<<<END-" in block:
                return answer("採点。", score)
        return answer("採点。", 4)  # the calibration.jsonl rows
    return respond


def store_of(workspace):
    return Store.open(workspace.settings.store_path())


def test_stored_labels_carry_their_conversation(workspace):
    store = store_of(workspace)
    ids = labelled_chat(store)
    fb.record_label(store, ids[1], "style", 5, note="ok")
    fb.record_label(store, ids[0], fb.THUMBS, fb.THUMBS_UP)  # thumbs are not a criterion
    other = labelled_chat(store, persona="someone-else")
    fb.record_label(store, other[0], "style", 2)
    [label] = stored_labels(store, "ayane", "style")
    assert label.interaction.id == ids[1]
    assert label.interaction.messages == (("user", "質問0"), ("assistant", "はい、そうですわ。"),
                                          ("user", "質問1"), ("assistant", "違いますの。"))
    assert (label.row.score, label.row.question, label.row.reason) == (5, "質問1", "ok")
    assert stored_labels(store, "ayane", fb.THUMBS)[0].row.score == fb.THUMBS_UP
    assert stored_labels(None, "ayane", "style") == []


async def test_a_criterion_without_file_rows_calibrates_on_stored_labels(server, make_judge,
                                                                         workspace):
    store = store_of(workspace)
    texts = ("はい、そうですわ。", "違いますの。", "舞台が好きです。")
    ids = labelled_chat(store, replies=texts)
    for rid, score in zip(ids, (2, 5, 7), strict=True):
        fb.record_label(store, rid, "style", score)
    server.responder = score_by_reply(dict(zip(texts, (2, 5, 6), strict=True)))
    judge = make_judge(criteria=["style"])
    report, pairs = await calibrate(judge, "style")
    await judge.aclose()
    assert report.sources == {"file": 0, "store": 3}
    a = report.agreement
    assert (a.n, a.scored) == (3, 3)
    assert a.exact == pytest.approx(2 / 3) and a.within_one == 1
    assert a.spearman == pytest.approx(1.0)
    assert [row.score for row, _ in pairs] == [2, 5, 7]
    # the verdicts are stored on the labelled replies, so the console shows them too
    judged = {r["message_id"] for r in judge.store.rows("judgments")}
    assert set(ids) <= judged


async def test_file_rows_and_stored_labels_together(server, make_judge, workspace):
    store = store_of(workspace)
    ids = labelled_chat(store)
    fb.record_label(store, ids[0], "personality", 4)
    fb.record_label(store, ids[0], "personality", 6, rater="aoi")  # two raters, two rows
    server.responder = score_by_reply({})
    judge = make_judge(concurrency=8)
    report, _ = await calibrate(judge, "personality")
    assert report.sources == {"file": 91, "store": 2} and report.agreement.n == 93
    asked = server.count
    again, _ = await calibrate(judge, "personality", use_store=False)
    await judge.aclose()
    assert again.sources == {"file": 91, "store": 0} and server.count == asked  # cached


def test_kyara_judge_calibrate_prints_the_counts_and_updates_the_status(server, configs,
                                                                         workspace):
    store = store_of(workspace)
    texts = ("はい、そうですわ。", "違いますの。")
    ids = labelled_chat(store, replies=texts)
    fb.record_label(store, ids[0], "style", 3)
    fb.record_label(store, ids[1], "style", 6)
    server.responder = score_by_reply(dict(zip(texts, (3, 6), strict=True)))
    home = workspace.settings.home_path()
    before = calibration_status(home, "scripted", "ayane", "style", "style-v2")
    assert before.state == "uncalibrated"

    result = CliRunner().invoke(
        app, ["judge", "calibrate", "--judge", "scripted", "--persona", "ayane",
              "--criterion", "all"],
        env={"KYARA_CONFIGS": str(configs), "COLUMNS": "160", "KYARA_HOME": os.environ[
            "KYARA_HOME"]}, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "91 from calibration.jsonl, 0 from the store" in result.stdout  # personality
    assert "0 from calibration.jsonl, 2 from the store" in result.stdout   # style
    judge = Workspace.load(configs)
    from pipelines.judge import Judge
    j = Judge.open(judge, "scripted", "ayane", store=None)
    assert j.calibration("style").label.startswith("ρ 1.00, ±1 100% (n=2")
    assert j.calibration("personality").state == "calibrated"
