"""Lint of the shipped Ayane persona: the data the judge, retrieval and training rely on."""

import shutil
import unicodedata
from collections import Counter

import pytest

from pipelines.config import PROBE_KINDS, ConfigError
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


LAB_QUESTION = "あなたの名前はなんですか?"  # the lab's own table question, ASCII "?" as written


def _norm(text: str) -> str:
    """How held-out text is compared, and how `expect` strings are matched: NFKC (full- and
    half-width alike), no whitespace, no middle dots (レ・ミゼラブル = レミゼラブル)."""
    return "".join(unicodedata.normalize("NFKC", text).split()).replace("・", "")


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


def test_dialogues_name_known_facts(data):
    """knowledge_ids: the facts a dialogue's last reply states, put into the train job's
    retrieval prompt when retrieval misses them (rag_share)."""
    facts = {f.id for f in data.knowledge}
    named = [d for d in data.dialogues if d.knowledge_ids]
    problems = [f"{d.id}: unknown {sorted(set(d.knowledge_ids) - facts)}" for d in named
                if not set(d.knowledge_ids) <= facts]
    problems += [f"{d.id}: named twice" for d in named
                 if len(set(d.knowledge_ids)) != len(d.knowledge_ids)]
    assert problems == []
    assert len(named) >= 100, "the dialogues that state a fact name it"


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


# --- the eval job's held-out sets (probes, scripts, scenarios) and eval's expect strings ---


def test_the_lab_question_is_the_first_eval_row(data):
    first = data.eval[0]
    assert first.id == "e000" and first.question == LAB_QUESTION
    assert first.knowledge_ids == ["k001"] and first.expect
    assert len({q.id for q in data.eval}) == len(data.eval)


def test_expect_strings_are_in_their_facts(data):
    facts = {f.id: _norm(f.text) for f in data.knowledge}
    problems = [f"{q.id}: {e!r} in none of {q.knowledge_ids}"
                for q in data.eval for e in q.expect
                if not any(_norm(e) in facts[k] for k in q.knowledge_ids)]
    assert problems == []
    assert all(q.knowledge_ids for q in data.eval if q.expect), "expect needs a fact"
    with_expect = sum(bool(q.expect) for q in data.eval)
    assert with_expect >= 0.8 * sum(bool(q.knowledge_ids) for q in data.eval)


def test_probes(data):
    probes = data.probes
    assert len(probes) >= 24
    assert len({p.id for p in probes}) == len(probes), "duplicate probe ids"
    kinds = Counter(p.kind for p in probes)
    assert set(kinds) == set(PROBE_KINDS), kinds  # every kind is asked
    assert len({_norm(p.question) for p in probes}) == len(probes), "duplicate probe question"
    for p in probes:
        assert "\n" not in p.expect and p.expect.rstrip().endswith("."), p.id  # one sentence


def test_scripts(data):
    scripts = data.scripts
    assert len(scripts) >= 12
    assert len({s.id for s in scripts}) == len(scripts), "duplicate script ids"
    for s in scripts:
        assert 4 <= len(s.turns) <= 6 and all(t.strip() for t in s.turns), s.id
        assert s.title.strip(), s.id


def test_scenarios(data):
    scenarios = data.scenarios
    assert len(scenarios) >= 4
    assert len({u.id for u in scenarios}) == len(scenarios), "duplicate scenario ids"
    assert all(u.scenario.strip() and u.opening.strip() for u in scenarios)


def test_eval_sets_are_held_out_of_training_and_calibration(data):
    """No probe, script turn or scenario opening is a user message the model was trained on
    (dialogues) or a question the judge was calibrated on; nor an eval question."""
    seen = {_norm(m.content) for d in data.dialogues for m in d.messages if m.role == "user"}
    seen |= {_norm(r.question) for r in data.calibration}
    seen |= {_norm(q.question) for q in data.eval}
    asked = ([(p.id, p.question) for p in data.probes]
             + [(s.id, t) for s in data.scripts for t in s.turns]
             + [(u.id, u.opening) for u in data.scenarios])
    leaked = [f"{where}: {text}" for where, text in asked if _norm(text) in seen]
    assert leaked == []


def test_missing_eval_set_files_are_empty_lists(tmp_path):
    persona = tmp_path / "personas" / "ayane"
    persona.mkdir(parents=True)
    shutil.copy(CONFIGS / "personas" / "ayane" / "persona.yaml", persona)
    got = Workspace(configs=tmp_path).persona_data("ayane")
    assert got.probes == [] and got.scripts == [] and got.scenarios == []


@pytest.mark.parametrize("filename, broken, expect", [
    ("probes.jsonl", '{"id": "p99", "question": "x", "kind": "weather", "expect": "y."}',
     "kind: expected: input should be"),
    ("probes.jsonl", '{"id": "p99", "question": "x", "kind": "code"', "invalid JSON"),
    ("scripts.jsonl", '{"id": "s99", "title": "t", "turns": ["a", "b", "c"]}',
     "turns: expected: list should have at least 4 items"),
    ("scripts.jsonl", '{"id": "s99", "title": "t", "turns": ["a", " ", "c", "d"]}',
     "turns: expected: item [1] is blank"),
    ("scenarios.jsonl", '{"id": "u99", "scenario": "s"}', "opening: missing required key"),
])
def test_a_broken_row_is_one_line_naming_file_and_line(tmp_path, filename, broken, expect):
    tree = tmp_path / "configs"
    shutil.copytree(CONFIGS / "personas", tree / "personas")
    path = tree / "personas" / "ayane" / filename
    lines = path.read_text(encoding="utf-8").splitlines()
    lines.insert(2, broken)  # the third line
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    ws = Workspace(configs=tree)
    with pytest.raises(ConfigError) as caught:
        ws.persona_data("ayane")
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{path}:3: ") and expect in message
    # `kyara config check` validates the file the same way
    [result] = ws.check([path])
    assert result.error == message and result.kind == path.stem


def test_config_check_validates_the_eval_sets():
    results = Workspace.load(CONFIGS).check()
    ours = {r.kind: r for r in results if r.kind in ("probes", "scripts", "scenarios")}
    assert set(ours) == {"probes", "scripts", "scenarios"}
    assert [r.error for r in ours.values() if r.error] == []
