"""pipelines/datasets.py and `kyara data export`: sft / dpo / kto / labels from the store."""

import json
import uuid

import pytest
from typer.testing import CliRunner

from console.cli import app
from pipelines import datasets as ds
from pipelines import feedback as fb
from pipelines.config import ConfigError
from store import Store, new_id, utcnow


def write(store, session, seq, role, content, **extra):
    row = {"id": new_id(), "session_id": session, "seq": seq, "role": role,
           "content": content, "status": "complete", "created_at": utcnow(), **extra}
    store.upsert("messages", [row])
    return store.get("messages", row["id"])


@pytest.fixture
def store(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("KYARA_HOME", str(home))
    return Store.open(home / "store")


@pytest.fixture
def chat(store):
    """Q1 -> A1 (then regenerated: A1b chosen), Q2 -> A2 (edited), Q3 -> A3 (an error)."""
    sid = new_id()
    store.upsert("sessions", [{"id": sid, "persona": "ayane", "variant": "v1", "kind": "chat"}])
    q1 = write(store, sid, 0, "user", "こんにちは")
    a1 = write(store, sid, 1, "assistant", "こんにちは。", variant="v1", rendered_prompt="<r1>")
    a1b = write(store, sid, 1, "assistant", "こんにちは、絢音です。", variant="v1",
                rendered_prompt="<r1b>")
    fb.add_alternative(store, a1["id"], a1b["id"])
    q2 = write(store, sid, 2, "user", "趣味は？")
    a2 = write(store, sid, 3, "assistant", "舞台かな", variant="v1", rendered_prompt="<r2>")
    a2e = fb.record_edit(store, a2["id"], "舞台を観ることです。")
    write(store, sid, 4, "user", "好きな作品は？")
    write(store, sid, 5, "assistant", "", status="error", error="boom")
    return {"sid": sid, "q1": q1, "a1": a1, "a1b": a1b, "q2": q2, "a2": a2, "a2e": a2e}


def test_sft_keeps_the_visible_replies_with_their_conversation(store, chat):
    made = ds.export(store, "sft")
    assert [r["messages"] for r in made.rows] == [
        [{"role": "user", "content": "こんにちは"},
         {"role": "assistant", "content": "こんにちは、絢音です。"}],
        [{"role": "user", "content": "こんにちは"},
         {"role": "assistant", "content": "こんにちは、絢音です。"},
         {"role": "user", "content": "趣味は？"},
         {"role": "assistant", "content": "舞台を観ることです。"}],
    ]
    first, second = made.rows
    assert first["rendered_prompt"] == "<r1b>" and second["rendered_prompt"] == "<r2>"
    assert first["ids"] == {"session": chat["sid"], "message": chat["a1b"]["id"],
                            "edit_of": None}
    assert second["ids"]["edit_of"] == chat["a2"]["id"]
    assert (first["source"], first["origin"], first["variants"]) == (
        "human", "chat", {"reply": "v1"})
    # choosing the first alternative again changes what the chat continues with
    fb.choose_alternative(store, chat["a1"]["id"])
    assert ds.export(store, "sft").rows[1]["messages"][1]["content"] == "こんにちは。"


def test_sft_in_sharegpt(store, chat):
    row = ds.export(store, "sft", fmt="sharegpt").rows[1]
    assert row["conversations"] == [
        {"from": "human", "value": "こんにちは"}, {"from": "gpt", "value": "こんにちは、絢音です。"},
        {"from": "human", "value": "趣味は？"}, {"from": "gpt", "value": "舞台を観ることです。"}]
    assert "messages" not in row and row["rendered_prompt"] == "<r2>"


def test_sft_min_score_keeps_labelled_replies_and_thumbs_up(store, chat):
    assert ds.export(store, "sft", min_score=5).rows == []  # nothing labelled yet
    fb.record_label(store, chat["a1b"]["id"], "personality", 6)
    fb.record_label(store, chat["a1b"]["id"], "style", 5)
    fb.record_label(store, chat["a2e"]["id"], fb.THUMBS, fb.THUMBS_UP)
    made = ds.export(store, "sft", min_score=5)
    assert [r["ids"]["message"] for r in made.rows] == [chat["a1b"]["id"], chat["a2e"]["id"]]
    assert made.rows[0]["scores"] == {"personality": 6, "style": 5}
    fb.record_label(store, chat["a1b"]["id"], "style", 4)  # one criterion below: out
    fb.record_label(store, chat["a2e"]["id"], fb.THUMBS, fb.THUMBS_DOWN)
    made = ds.export(store, "sft", min_score=5)
    assert made.rows == [] and made.counts["below --min-score"] == 2


def test_sft_from_the_judges_scores(store, chat):
    store.upsert("judgments", [{
        "id": new_id(), "message_id": chat["a2e"]["id"], "criterion": "personality",
        "judge_model": "m", "prompt_version": "v", "status": "ok", "score": 7}])
    made = ds.export(store, "sft", source="judge", min_score=6)
    assert [r["ids"]["message"] for r in made.rows] == [chat["a2e"]["id"]]
    assert made.rows[0]["source"] == "judge"


def vote(store, chat, tie=False):
    sid = chat["sid"]
    other = write(store, sid, 3, "assistant", "観劇です。", variant="v2")
    return fb.record_preference(
        store, prompt=[{"role": "user", "content": "趣味は？"}], chosen=other,
        rejected=chat["a2e"], tie=tie, source="human", rater="me", session_id=sid,
        variants={"chosen": "v2", "rejected": "v1"}, rendered_prompt="<rp>")


def test_dpo_in_trls_conversational_form(store, chat):
    pref = vote(store, chat)
    vote(store, chat, tie=True)
    made = ds.export(store, "dpo")
    [row] = made.rows
    assert row["prompt"] == [{"role": "user", "content": "趣味は？"}]
    assert row["chosen"] == [{"role": "assistant", "content": "観劇です。"}]
    assert row["rejected"] == [{"role": "assistant", "content": "舞台を観ることです。"}]
    assert row["rendered_prompt"] == "<rp>" and row["source"] == "human"
    assert row["ids"] == {"preference": pref["id"], "session": chat["sid"],
                          "chosen": pref["chosen_id"], "rejected": chat["a2e"]["id"]}
    assert row["variants"] == {"chosen": "v2", "rejected": "v1"}
    assert made.counts["ties left out"] == 1
    assert row["id"] == pref["id"]
    from pipelines.training.preference import check_row
    assert check_row(json.loads(json.dumps(row)), "dpo", "row 1")[0]["chosen"] == \
        row["chosen"][0]  # the prefer job reads the export as it is
    share = ds.export(store, "dpo", fmt="sharegpt").rows[0]
    assert share["conversations"] == [{"from": "human", "value": "趣味は？"}]
    assert share["chosen"] == {"from": "gpt", "value": "観劇です。"}


def test_kto_from_votes_and_thumbs(store, chat):
    vote(store, chat)
    fb.record_label(store, chat["a1b"]["id"], fb.THUMBS, fb.THUMBS_DOWN)
    made = ds.export(store, "kto")
    got = [(r["completion"][0]["content"], r["label"]) for r in made.rows]
    assert got == [("観劇です。", True), ("舞台を観ることです。", False),
                   ("こんにちは、絢音です。", False)]
    thumbs = made.rows[2]
    assert thumbs["prompt"] == [{"role": "user", "content": "こんにちは"}]
    assert thumbs["criterion"] == "thumbs" and thumbs["rendered_prompt"] == "<r1b>"
    assert ds.export(store, "kto", fmt="sharegpt").rows[0]["kto_tag"] is True
    from pipelines.training.preference import check_row
    assert [check_row(r, "kto", "row")[0]["label"] for r in made.rows] == [True, False, False]


def test_labels_export(store, chat):
    fb.record_label(store, chat["a2e"]["id"], "personality", 5, note="ok")
    [row] = ds.export(store, "labels").rows
    assert (row["criterion"], row["score"], row["rater"], row["note"]) == (
        "personality", 5, "me", "ok")
    assert row["question"] == "趣味は？" and row["reply"] == "舞台を観ることです。"
    assert row["prompt"][-1] == {"role": "user", "content": "趣味は？"}


# --- the judge's pairwise verdicts ------------------------------------------------------------


def eval_run(store, home, outcome="win", judged=True):
    """An eval run as the eval job leaves it: sessions and messages in the store, the
    pairwise verdicts in judgments, replies.jsonl and verdicts.jsonl in its folder."""
    folder = home / "evals" / "e1"
    folder.mkdir(parents=True)
    replies, ids = [], {}
    for combo in ("base", "tuned"):
        sid = str(uuid.uuid4())
        store.upsert("sessions", [{"id": sid, "persona": "ayane", "variant": combo,
                                   "kind": "eval"}])
        rid = str(uuid.uuid4())
        ids[combo] = rid
        text = {"base": "ベースの返事。", "tuned": "絢音の返事です。"}[combo]
        store.upsert("messages", [
            {"id": f"{rid}:0", "session_id": sid, "seq": 100, "role": "user",
             "content": "趣味は？", "created_at": utcnow()},
            {"id": rid, "session_id": sid, "seq": 101, "role": "assistant", "content": text,
             "variant": combo, "rendered_prompt": f"<{combo}>", "created_at": utcnow()}])
        replies.append({"id": rid, "combo": combo, "set": "heldout", "question_id": "q1",
                        "sample": 0, "question": "趣味は？", "text": text,
                        "transcript": [{"role": "user", "content": "趣味は？"},
                                       {"role": "assistant", "content": text}]})
    if judged:
        store.upsert("judgments", [{
            "id": new_id(), "message_id": ids["tuned"], "criterion": "pairwise:personality",
            "judge_model": "m", "prompt_version": "pairwise-v1", "status": "ok", "score": s}
            for s in (1, 2)])
    (folder / "replies.jsonl").write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in replies), encoding="utf-8")
    verdict = {"kind": "pairwise", "combo": "tuned", "reference": "base", "set": "heldout",
               "question_id": "q1", "sample": 0, "criterion": "personality", "first": "A",
               "second": "B", "outcome": outcome, "error": None}
    (folder / "verdicts.jsonl").write_text(
        json.dumps({"kind": "score", "reply_id": ids["tuned"]}) + "\n" + json.dumps(verdict)
        + "\n", encoding="utf-8")
    return folder, ids


def test_judge_pairs_from_the_eval_job(store, tmp_path):
    folder, ids = eval_run(store, tmp_path / "home")
    [row] = ds.export(store, "dpo", source="judge", eval_dirs=[folder]).rows
    assert row["chosen"][0]["content"] == "絢音の返事です。"
    assert row["rejected"][0]["content"] == "ベースの返事。"
    assert row["prompt"] == [{"role": "user", "content": "趣味は？"}]
    assert row["variants"] == {"chosen": "tuned", "rejected": "base"}
    assert row["ids"]["chosen"] == ids["tuned"] and row["source"] == "judge"
    assert row["criterion"] == "personality" and row["rendered_prompt"] == "<tuned>"
    assert row["origin"] == "eval e1"
    assert ds.export(store, "dpo", eval_dirs=[folder]).rows == []  # human only by default


@pytest.mark.parametrize("outcome,chosen", [("loss", "base"), ("tie", None)])
def test_a_judge_loss_or_tie(store, tmp_path, outcome, chosen):
    folder, _ = eval_run(store, tmp_path / "home", outcome=outcome)
    [pref] = ds.judge_preferences(store, [folder])
    assert pref["tie"] is (outcome == "tie")
    if chosen:
        assert json.loads(pref["variants_json"])["chosen"] == chosen
    assert len(ds.export(store, "dpo", source="judge", eval_dirs=[folder]).rows) == (
        1 if chosen else 0)


def test_judge_pairs_need_both_replies_stored_and_the_verdicts(store, tmp_path):
    folder, ids = eval_run(store, tmp_path / "home", judged=False)
    assert ds.judge_preferences(store, [folder]) == []
    store.upsert("judgments", [{
        "id": new_id(), "message_id": ids["tuned"], "criterion": "pairwise:personality",
        "judge_model": "m", "prompt_version": "pairwise-v1", "status": "ok", "score": 1}])
    assert len(ds.judge_preferences(store, [folder])) == 1
    store.delete("messages", [ids["base"]])
    assert ds.judge_preferences(store, [folder]) == []


def test_a_damaged_eval_file_is_one_line_naming_the_row(store, tmp_path):
    folder, _ = eval_run(store, tmp_path / "home")
    with open(folder / "verdicts.jsonl", "a", encoding="utf-8") as fh:
        fh.write("{not json\n")
    with pytest.raises(ConfigError, match=r"verdicts.jsonl:3: invalid JSON"):
        ds.judge_preferences(store, [folder])


# --- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,words", [
    ({"kind": "rlhf"}, "kind must be"), ({"kind": "sft", "source": "crowd"}, "--source"),
    ({"kind": "sft", "fmt": "alpaca"}, "--format"), ({"kind": "sft", "min_score": 9}, "1 to 7"),
    ({"kind": "dpo", "min_score": 5}, "sft only"),
    ({"kind": "labels", "fmt": "sharegpt"}, "labels"),
])
def test_bad_export_options(store, kwargs, words):
    with pytest.raises(ConfigError, match=words):
        ds.export(store, **kwargs)


# --- the command ------------------------------------------------------------------------------


def invoke(*args):
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "160"}, catch_exceptions=False)


def test_kyara_data_export(store, chat, tmp_path):
    out = tmp_path / "sft.jsonl"
    result = invoke("data", "export", "sft", "-o", str(out))
    assert result.exit_code == 0, result.output
    assert "2 sft rows" in result.stdout
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 2 and rows[0]["messages"][-1]["content"] == "こんにちは、絢音です。"
    from pipelines.training.data import read_conversations
    assert len(read_conversations(out)) == 2  # the train job reads it as it is

    nothing = invoke("data", "export", "dpo", "-o", str(tmp_path / "dpo.jsonl"))
    assert nothing.exit_code == 2 and "nothing to export" in nothing.output
    assert not (tmp_path / "dpo.jsonl").exists()
    bad = invoke("data", "export", "sft", "-o", str(out), "--format", "alpaca")
    assert bad.exit_code == 2 and len(bad.output.strip().splitlines()) == 1


def test_kyara_data_export_judge_pairs(store, tmp_path):
    eval_run(store, tmp_path / "home")
    out = tmp_path / "dpo.jsonl"
    result = invoke("data", "export", "dpo", "--source", "judge", "-o", str(out))
    assert result.exit_code == 0, result.output
    [row] = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert row["variants"] == {"chosen": "tuned", "rejected": "base"}


def test_a_label_on_a_reply_no_longer_shown_keeps_its_context(store, chat):
    fb.record_label(store, chat["a1"]["id"], "personality", 2)  # a1b is the chosen one
    [row] = ds.export(store, "labels").rows
    assert row["reply"] == "こんにちは。" and row["question"] == "こんにちは"
    store.delete("messages", [chat["a1"]["id"]])
    made = ds.export(store, "labels")
    assert made.rows == [] and made.counts["on deleted replies"] == 1


def test_sft_leaves_out_a_reply_that_lost_a_vote(store, chat):
    vote(store, chat)  # the edited a2 lost to another reply
    made = ds.export(store, "sft")
    assert chat["a2e"]["id"] not in [r["ids"]["message"] for r in made.rows]
    assert made.counts["lost a vote"] == 1
