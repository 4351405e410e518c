"""pipelines/feedback.py: labels, alternatives, edits and preferences in the store."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipelines import feedback as fb
from pipelines.feedback import FeedbackError
from store import Store, new_id, utcnow

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def store(tmp_path):
    return Store.open(tmp_path / "store")


def write(store, session, seq, role, content, **extra):
    row = {"id": new_id(), "session_id": session, "seq": seq, "role": role,
           "content": content, "status": "complete", "created_at": utcnow(), **extra}
    store.upsert("messages", [row])
    return store.get("messages", row["id"])


@pytest.fixture
def chat(store):
    """A session: user, reply, user, reply."""
    sid = new_id()
    store.upsert("sessions", [{"id": sid, "persona": "ayane", "variant": "v1"}])
    rows = [write(store, sid, 0, "user", "こんにちは"),
            write(store, sid, 1, "assistant", "こんにちは、絢音です。", variant="v1",
                  rendered_prompt="<p1>"),
            write(store, sid, 2, "user", "趣味は？"),
            write(store, sid, 3, "assistant", "舞台を観ることです。", variant="v1")]
    return sid, rows


def one_line(err):
    assert "\n" not in str(err) and str(err)


# --- labels ------------------------------------------------------------------------------


def test_a_label_is_stored_and_read_back(store, chat):
    _, rows = chat
    reply = rows[1]["id"]
    row = fb.record_label(store, reply, "personality", 6, note="good")
    assert row["rater"] == "me" and row["score"] == 6
    fb.record_label(store, reply, "thumbs", fb.THUMBS_UP)
    assert fb.labels_for(store, [reply, rows[3]["id"]]) == {
        reply: {"personality": 6, "thumbs": 2}}
    assert fb.labels_for(store, []) == {}


def test_one_label_per_message_criterion_and_rater(store, chat):
    reply = chat[1][1]["id"]
    fb.record_label(store, reply, "personality", 3)
    fb.record_label(store, reply, "personality", 5)
    fb.record_label(store, reply, "personality", 7, rater="aoi")
    assert store.count("labels") == 2
    assert {r["rater"]: r["score"] for r in fb.label_rows(store, "personality")} == {
        "me": 5, "aoi": 7}
    assert fb.labels_for(store, [reply]) == {reply: {"personality": 7}}  # the latest


@pytest.mark.parametrize("criterion,score,words", [
    ("personality", 0, "1 to 7"), ("personality", 8, "1 to 7"), ("personality", 4.5, "whole"),
    ("personality", True, "whole"), ("thumbs", 3, "1 (down) or 2 (up)"), ("", 3, "criterion"),
])
def test_bad_label_values_store_nothing(store, chat, criterion, score, words):
    with pytest.raises(FeedbackError) as caught:
        fb.record_label(store, chat[1][1]["id"], criterion, score)
    one_line(caught.value)
    assert words in str(caught.value)
    assert store.count("labels") == 0


def test_a_label_on_a_deleted_reply_or_a_user_turn_stores_nothing(store, chat):
    _, rows = chat
    store.delete("messages", [rows[1]["id"]])
    with pytest.raises(FeedbackError, match="does not exist") as caught:
        fb.record_label(store, rows[1]["id"], "thumbs", 1)
    one_line(caught.value)
    with pytest.raises(FeedbackError, match="not a reply"):
        fb.record_label(store, rows[0]["id"], "thumbs", 1)
    assert store.count("labels") == 0
    assert isinstance(caught.value, ValueError)


# --- alternatives --------------------------------------------------------------------------


def test_alternatives_form_a_group_and_the_newest_is_chosen(store, chat):
    sid, rows = chat
    original = rows[3]
    assert fb.alternatives(store, original["id"]) == [original]
    assert fb.visible_reply_ids(store, sid) == {rows[1]["id"], original["id"]}

    second = write(store, sid, 3, "assistant", "観劇です。")
    fb.add_alternative(store, original["id"], second["id"])
    third = write(store, sid, 3, "assistant", "お芝居を観ることかな。")
    fb.add_alternative(store, second["id"], third["id"])  # via any member: the same group

    group = fb.alternatives(store, original["id"])
    assert [m["id"] for m in group] == [original["id"], second["id"], third["id"]]
    assert fb.alternatives(store, third["id"]) == group
    assert fb.visible_reply_ids(store, sid) == {rows[1]["id"], third["id"]}
    assert fb.chosen_id(store, original["id"]) == third["id"]
    positions = {r["message_id"]: r["position"] for r in store.rows("alternatives")}
    assert positions == {original["id"]: 0, second["id"]: 1, third["id"]: 2}

    fb.choose_alternative(store, original["id"])
    assert fb.visible_reply_ids(store, sid) == {rows[1]["id"], original["id"]}
    assert [r["chosen"] for r in sorted(store.rows("alternatives"),
                                        key=lambda r: r["position"])] == [True, False, False]

    fb.add_alternative(store, original["id"], second["id"])  # again: chosen, not duplicated
    assert store.count("alternatives") == 3
    assert fb.chosen_id(store, third["id"]) == second["id"]


def test_choosing_a_reply_without_alternatives_changes_nothing(store, chat):
    fb.choose_alternative(store, chat[1][3]["id"])
    assert store.count("alternatives") == 0


def test_when_the_chosen_alternative_is_deleted_the_last_left_is_visible(store, chat):
    sid, rows = chat
    second = write(store, sid, 3, "assistant", "観劇です。")
    fb.add_alternative(store, rows[3]["id"], second["id"])
    store.delete("messages", [second["id"]])
    assert fb.visible_reply_ids(store, sid) == {rows[1]["id"], rows[3]["id"]}
    assert [m["id"] for m in fb.alternatives(store, rows[3]["id"])] == [rows[3]["id"]]


def test_bad_alternatives_store_nothing(store, chat):
    sid, rows = chat
    other = new_id()
    elsewhere = write(store, other, 0, "assistant", "別の話")
    with pytest.raises(FeedbackError, match="another session"):
        fb.add_alternative(store, rows[3]["id"], elsewhere["id"])
    with pytest.raises(FeedbackError, match="not a reply"):
        fb.add_alternative(store, rows[3]["id"], rows[2]["id"])
    with pytest.raises(FeedbackError, match="does not exist"):
        fb.add_alternative(store, rows[3]["id"], new_id())
    with pytest.raises(FeedbackError, match="does not exist"):
        fb.choose_alternative(store, new_id())
    assert store.count("alternatives") == 0


# --- edits ----------------------------------------------------------------------------------


def test_an_edit_keeps_the_original_and_becomes_the_visible_reply(store, chat):
    sid, rows = chat
    original = rows[1]
    edited = fb.record_edit(store, original["id"], "こんにちは。絢音です！")
    assert store.get("messages", original["id"])["content"] == original["content"]
    stored = store.get("messages", edited["id"])
    assert stored["content"] == "こんにちは。絢音です！"
    assert (stored["session_id"], stored["seq"], stored["role"], stored["status"]) == (
        sid, 1, "assistant", "complete")
    assert json.loads(stored["options_json"]) == {"edit_of": original["id"]}
    assert stored["variant"] == "v1" and stored["rendered_prompt"] == "<p1>"
    [edit] = fb.edits_of(store)
    assert (edit["message_id"], edit["edited_id"], edit["original_text"], edit["edited_text"]) \
        == (original["id"], edited["id"], original["content"], "こんにちは。絢音です！")
    assert fb.visible_reply_ids(store, sid) == {edited["id"], rows[3]["id"]}
    assert [m["id"] for m in fb.alternatives(store, original["id"])] == [
        original["id"], edited["id"]]
    # going back to the original is a choice like any other
    fb.choose_alternative(store, original["id"])
    assert fb.visible_reply_ids(store, sid) == {original["id"], rows[3]["id"]}


def test_bad_edits_store_nothing(store, chat):
    _, rows = chat
    for text, words in [("  ", "empty"), (rows[1]["content"], "changes nothing")]:
        with pytest.raises(FeedbackError, match=words):
            fb.record_edit(store, rows[1]["id"], text)
    with pytest.raises(FeedbackError, match="does not exist"):
        fb.record_edit(store, new_id(), "x")
    assert store.count("edits") == 0 and store.count("messages") == 4


# --- preferences ----------------------------------------------------------------------------


def test_a_human_vote_between_two_stored_replies(store, chat):
    sid, rows = chat
    other = write(store, sid, 3, "assistant", "観劇かな。", variant="v2")
    prompt = [{"role": "user", "content": "こんにちは"}, {"role": "assistant", "content": "x"},
              {"role": "user", "content": "趣味は？"}]
    row = fb.record_preference(store, prompt=prompt, chosen=other, rejected=rows[3], tie=False,
                               source="human", variants={"chosen": "v2", "rejected": "v1"},
                               rater="me", session_id=sid, rendered_prompt="<p>")
    stored = store.get("preferences", row["id"])
    assert (stored["chosen_id"], stored["rejected_id"]) == (other["id"], rows[3]["id"])
    assert (stored["chosen_text"], stored["rejected_text"]) == ("観劇かな。", "舞台を観ることです。")
    assert json.loads(stored["prompt_json"]) == prompt
    assert json.loads(stored["variants_json"]) == {"chosen": "v2", "rejected": "v1"}
    assert stored["tie"] is False and stored["source"] == "human"
    assert [r["id"] for r in fb.preference_rows(store, "human")] == [row["id"]]
    assert fb.preference_rows(store, "judge") == []


def test_a_preference_between_texts_and_a_tie(store):
    row = fb.record_preference(store, prompt=[{"role": "user", "content": "q"}], chosen="a",
                               rejected="b", tie=True, source="style", variants={})
    stored = store.get("preferences", row["id"])
    assert stored["chosen_id"] is None and stored["tie"] is True
    assert json.loads(stored["variants_json"]) == {"chosen": None, "rejected": None}


def test_a_vote_on_a_deleted_reply_stores_nothing(store, chat):
    sid, rows = chat
    other = write(store, sid, 3, "assistant", "観劇かな。")
    store.delete("messages", [other["id"]])
    with pytest.raises(FeedbackError) as caught:
        fb.record_preference(store, prompt=[{"role": "user", "content": "趣味は？"}],
                             chosen=other, rejected=rows[3], tie=False, source="human",
                             variants={"chosen": "v2", "rejected": "v1"})
    one_line(caught.value)
    assert "does not exist" in str(caught.value) and other["id"] in str(caught.value)
    assert store.count("preferences") == 0


@pytest.mark.parametrize("change,words", [
    ({"prompt": []}, "non-empty list"),
    ({"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
     "does not end on the user's turn"),
    ({"prompt": [{"role": "narrator", "content": "q"}]}, "role 'narrator'"),
    ({"chosen": "  "}, "chosen reply is empty"),
    ({"rejected": {"id": "x"}}, "rejected reply is empty"),
    ({"rejected": 3}, "must be a message or a text"),
    ({"tie": "no"}, "tie must be"),
    ({"source": "crowd"}, "source is one of"),
    ({"variants": {"chosen": 3}}, "chosen variant"),
])
def test_bad_preferences_store_nothing(store, change, words):
    given = {"prompt": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": "b",
             "tie": False, "source": "human", "variants": {"chosen": "v1", "rejected": "v2"},
             **change}
    with pytest.raises(FeedbackError) as caught:
        fb.record_preference(store, **given)
    one_line(caught.value)
    assert words in str(caught.value)
    assert store.count("preferences") == 0


# --- concurrency ------------------------------------------------------------------------------

ADDER = textwrap.dedent("""
    import sys
    sys.path.insert(0, {repo!r})
    from pipelines import feedback as fb
    from store import Store, new_id, utcnow
    store = Store.open(sys.argv[1])
    for k in range(int(sys.argv[4])):
        mid = new_id()
        store.upsert("messages", [{{"id": mid, "session_id": sys.argv[2], "seq": 3,
                                   "role": "assistant", "content": f"alt {{k}}",
                                   "created_at": utcnow()}}])
        fb.add_alternative(store, sys.argv[3], mid)
        fb.record_label(store, mid, "thumbs", 2)
""")


def test_alternatives_from_two_processes_at_once_stay_one_consistent_group(store, chat,
                                                                          tmp_path):
    sid, rows = chat
    script = tmp_path / "adder.py"
    script.write_text(ADDER.format(repo=str(REPO)))
    procs = [subprocess.Popen([sys.executable, str(script), str(store.path), sid, rows[3]["id"],
                               "4"], stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for proc in procs:
        assert proc.wait(timeout=120) == 0, proc.stderr.read()
    group = store.rows("alternatives")
    assert len(group) == 9  # the original and 2 x 4
    assert sorted(g["position"] for g in group) == list(range(9))
    assert sum(g["chosen"] for g in group) == 1
    assert len({g["group_id"] for g in group}) == 1
    assert store.count("labels") == 8
    assert len(fb.visible_reply_ids(store, sid)) == 2
