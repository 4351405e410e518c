"""Lint of the shipped Ayane persona: the data the judge, retrieval and training rely on."""

from collections import Counter

import pytest

from pipelines.workspace import Workspace
from tests.conftest import CONFIGS

SYSTEM = (
    "お嬢様のように振る舞ってほしいです。お嬢様が使うようなトーン、方式、語彙を使ってお嬢様のように"
    "応答してほしいです。応答の長さは 1 文程度で、30 文字程度に簡潔に応答してください。"
)
RAG_TAIL = (
    "また応答の参考になりうるお嬢様の情報を与えます。応答の参考にならない情報を含む場合もあるので"
    "その場合は無視してください。"
)


@pytest.fixture(scope="module")
def data():
    return Workspace.load(CONFIGS).persona_data("ayane")


def test_persona_profile_and_prompts(data):
    p = data.persona
    assert p.name == "小野寺絢音"
    for fact in ("18", "高校3年", "ミュージカル", "不動産", "兄", "アメリカ", "ゴールデンレトリバー",
                 "スカート"):
        assert fact in p.profile, fact
    assert p.speech.first_person == "わたくし"
    assert {"ですわ", "ますわ", "ですの"} <= set(p.speech.endings)
    assert p.speech.sentence_end == "。"
    assert p.prompts.system == SYSTEM
    assert p.prompts.system_rag.startswith(SYSTEM + RAG_TAIL)
    assert p.prompts.system_rag.rstrip().endswith("{context}")


def test_knowledge_facts(data):
    ids = [f.id for f in data.knowledge]
    assert len(ids) >= 80
    assert len(set(ids)) == len(ids), "duplicate knowledge ids"
    assert all(f.topic.strip() and f.text.strip() for f in data.knowledge)


def test_dialogues_are_in_the_speech_rules(data):
    rules = data.persona.speech
    assert len(data.dialogues) >= 300
    ids = [d.id for d in data.dialogues]
    assert None not in ids and len(set(ids)) == len(ids)
    multi = 0
    problems = []
    for d in data.dialogues:
        roles = [m.role for m in d.messages]
        assert roles[0] == "user" and roles[-1] == "assistant", d.id
        assert all(a != b for a, b in zip(roles, roles[1:], strict=False)), f"{d.id}: roles must alternate"
        multi += roles.count("user") > 1
        for m in d.messages:
            if m.role != "assistant":
                continue
            text = m.content
            if not text.endswith(rules.sentence_end):
                problems.append(f"{d.id}: does not end with 。: {text}")
            if "\n" in text:
                problems.append(f"{d.id}: has a newline")
            if len(text) > rules.max_chars:
                problems.append(f"{d.id}: {len(text)} chars > {rules.max_chars}")
            if text[:-1].count("。"):
                problems.append(f"{d.id}: more than one sentence: {text}")
    assert problems == []
    assert multi >= 20, "some conversations must be multi-turn"


def test_eval_questions_are_held_out_and_resolve(data):
    facts = {f.id for f in data.knowledge}
    assert len(data.eval) >= 50
    asked = {m.content.strip() for d in data.dialogues for m in d.messages if m.role == "user"}
    for q in data.eval:
        assert q.question.strip() not in asked, f"{q.id} appears in dialogues"
        missing = set(q.knowledge_ids) - facts
        assert not missing, f"{q.id}: unknown knowledge ids {missing}"
    needing = sum(bool(q.knowledge_ids) for q in data.eval)
    assert needing >= 30 and len(data.eval) - needing >= 5  # facts and small talk both


def test_calibration_covers_every_score(data):
    rows = data.calibration
    assert len(rows) >= 70
    counts = Counter(r.score for r in rows)
    assert all(counts[s] >= 8 for s in range(1, 8)), counts
    assert len({r.id for r in rows}) == len(rows)
    assert all(r.reason.strip() and "\n" not in r.reason for r in rows)
