"""The train job's retrieval prompt (`rag_share`, issue 17): the share of examples it takes,
the prompt equal to the one chat renders for the same question and facts, the named fact
put in when retrieval misses it, the checkpoint fingerprint, and the config errors."""

from __future__ import annotations

import inspect
import json
from collections.abc import Iterator, Sequence

import pytest
import yaml

from pipelines.chat import ChatSession
from pipelines.config import ConfigError, KnowledgeFact, TrainJob, load_jsonl, parse_job
from pipelines.inference.base import Delta, GenerationOptions
from pipelines.jobs import JobContext, get_job
from pipelines.jobs import train as job
from pipelines.prompting import render_prompt
from pipelines.retrieval import Retriever, get_embedder, index_persona
from pipelines.retrieval.opening import find_retriever
from pipelines.training import rag_examples as rag
from pipelines.training.trainer import COMPLETE
from pipelines.workspace import Workspace
from store import Store
from tests.conftest import CONFIGS
from tests.training.conftest import DIALOGUES, train_job

# A few of Ayane's facts, for the tiny-model persona (ids as in the shipped file).
TINY_FACTS = ["k001", "k010", "k013", "k027", "k033", "k059", "k074", "k104"]


@pytest.fixture(scope="module")
def persona():
    return Workspace.load(CONFIGS).persona("ayane")


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    """Ayane's shipped facts in a store, indexed as `kyara index` does."""
    store = Store.open(tmp_path_factory.mktemp("rag-train") / "store")
    facts = load_jsonl(CONFIGS / "personas" / "ayane" / "knowledge.jsonl", KnowledgeFact)
    index_persona(store, "ayane", facts, get_embedder())
    return store


@pytest.fixture(scope="module")
def retriever(indexed):
    found = find_retriever(indexed, "ayane")  # the one chat opens
    yield found
    found.close()


class RecordingBackend:
    """A ChatBackend that answers with queued replies and keeps the messages it was sent."""

    name = "recording"

    def __init__(self, replies: Sequence[str]) -> None:
        self.replies, self.calls = list(replies), []

    def render(self, messages: Sequence[dict]) -> str:
        return render_prompt("gemma", messages, bos_token="<bos>")

    def stream(self, messages, options: GenerationOptions) -> Iterator[Delta]:
        self.calls.append([dict(m) for m in messages])
        yield Delta(text=self.replies.pop(0))
        yield Delta(done=True, stop_reason="eos", stop_token="<end_of_turn>")

    def close(self) -> None:
        pass


def conversation(cid: str, *turns: str, knowledge_ids: Sequence[str] = ()) -> dict:
    roles = ["user", "assistant"] * (len(turns) // 2)
    row = {"id": cid, "messages": [{"role": r, "content": t}
                                   for r, t in zip(roles, turns, strict=True)]}
    if knowledge_ids:
        row["knowledge_ids"] = list(knowledge_ids)
    return row


# --- choosing and filling ---------------------------------------------------------------


def test_the_share_is_taken_by_seed():
    chosen = rag.choose(40, 0.25, seed=0)
    assert len(chosen) == 10 and chosen == sorted(set(chosen)) and max(chosen) < 40
    assert rag.choose(40, 0.25, seed=0) == chosen  # a rerun picks the same examples
    assert rag.choose(40, 0.25, seed=1) != chosen
    assert rag.choose(40, 0, seed=0) == [] and rag.choose(40, 1, seed=0) == list(range(40))
    assert len(rag.choose(7, 0.5, seed=3)) == 4  # round(3.5)


def test_a_missed_gold_fact_replaces_the_lowest_ranked_distractor():
    hits = [(f, f.upper()) for f in "abcde"]
    facts, retrieved, inserted = rag.with_gold(hits, [("x", "X")], 5)
    assert [f for f, _ in facts] == ["a", "b", "c", "d", "x"] and (retrieved, inserted) == (0, ["x"])
    facts, retrieved, inserted = rag.with_gold(hits, [("c", "C")], 5)
    assert facts == hits and (retrieved, inserted) == (1, [])
    # the gold fact retrieval found at the bottom stays; the other takes the next slot up
    facts, retrieved, inserted = rag.with_gold(hits, [("x", "X"), ("e", "E")], 5)
    assert [f for f, _ in facts] == ["a", "b", "c", "x", "e"] and (retrieved, inserted) == (1, ["x"])
    # fewer hits than k: nothing retrieved is dropped
    facts, _, inserted = rag.with_gold(hits[:2], [("x", "X")], 5)
    assert [f for f, _ in facts] == ["a", "b", "x"] and inserted == ["x"]


# --- with the real retriever and chat ---------------------------------------------------


def test_the_training_prompt_is_the_one_chat_renders(indexed, retriever, persona):
    single = conversation("s1", "飼っている犬の名前は？", "ゴールデンレトリバーのレオですわ。",
                          knowledge_ids=["k027"])
    multi = conversation("m1", "好きな飲み物は？", "ダージリンの紅茶ですわ。",
                         "犬は飼ってる？", "レオという大きな子がおりますわ。")
    rows, counts = rag.add_rag_prompts([single, multi], persona, retriever,
                                       rag.indexed_facts(indexed, "ayane"), 1.0, 5, seed=0)
    assert counts.examples == 2 and counts.gold_retrieved == 1 and counts.gold_inserted == 0
    assert rows[0]["rag"]["inserted"] == [] and "k027" in rows[0]["rag"]["facts"]

    for row in rows:  # chat, turn by turn, retrieval on, answering with the dialogue's replies
        turns = [m["content"] for m in row["messages"] if m["role"] != "system"]
        backend = RecordingBackend(turns[1::2])
        session = ChatSession(store=indexed, persona=persona,
                              variant=Workspace.load(CONFIGS).variant("gemma3-270m"),
                              backend=backend, retriever=retriever, rag=True)
        for question in turns[0::2]:
            list(session.send(question))
        # what chat sends for the last user turn is the example without its trained reply
        assert backend.calls[-1] == row["messages"][:-1]
        assert backend.render(backend.calls[-1]) == backend.render(row["messages"][:-1])
    assert rows[1]["messages"][0]["content"].count("レオ") >= 1  # retrieved for the last turn


def test_the_named_fact_is_put_in_when_retrieval_misses_it(indexed, retriever, persona):
    question = "おはようございます、今日もいい天気ですね。"
    top = [h.fact_id for h in retriever.search(question, k=5)]
    assert "k104" not in top  # the spider fact is not what a greeting retrieves
    row = conversation("g1", question, "ごきげんよう、クモさえ出なければ最高ですわ。",
                       knowledge_ids=["k104"])
    facts = rag.indexed_facts(indexed, "ayane")
    (out,), counts = rag.add_rag_prompts([row], persona, retriever, facts, 1.0, 5, seed=0)
    assert out["rag"] == {"facts": [*top[:4], "k104"], "inserted": ["k104"]}
    assert counts.gold_inserted == 1 and counts.gold_retrieved == 0 and counts.naming_facts == 1
    system = out["messages"][0]
    assert system == {"role": "system", "content": rag.rag_system_prompt(
        persona, [facts[f] for f in out["rag"]["facts"]])}
    assert system["content"].endswith(f"- {facts['k104']}")
    assert out["messages"][1:] == row["messages"] and "rag" not in row  # input untouched


def test_keep_plain_adds_the_retrieval_examples_beside_the_plain_ones(indexed, retriever,
                                                                     persona):
    rows = [conversation(f"c{i}", q, "はい、そうですわ。") for i, q in
            enumerate(["犬は飼ってる？", "好きな花は？", "誕生日はいつ？", "部活は？"])]
    facts = rag.indexed_facts(indexed, "ayane")
    out, counts = rag.add_rag_prompts(rows, persona, retriever, facts, 0.5, 5, seed=0,
                                      keep_plain=True)
    chosen = rag.choose(4, 0.5, seed=0)
    assert counts.examples == 2 and len(out) == 6
    assert [r for r in out if "rag" not in r] == rows  # every plain example, unchanged
    assert [r["id"] for r in out if "rag" in r] == [f"c{i}" for i in chosen]
    swapped, _ = rag.add_rag_prompts(rows, persona, retriever, facts, 0.5, 5, seed=0)
    assert [r for r in out if "rag" in r] == [r for r in swapped if "rag" in r]


def test_a_named_fact_that_is_not_indexed_is_refused(indexed, retriever, persona):
    row = conversation("d9", "質問", "答えですわ。", knowledge_ids=["k999"])
    with pytest.raises(ConfigError, match=r"^dialogue d9: knowledge_ids: k999 is not one"):
        rag.add_rag_prompts([row], persona, retriever, rag.indexed_facts(indexed, "ayane"),
                            0.0, 5, seed=0)


# --- in the train job ---------------------------------------------------------------------


@pytest.fixture
def rag_configs(train_configs):
    """The tiny-model persona with a few facts and dialogues that name them, and short
    prompts (the tiny models see 256 positions)."""
    persona_dir = train_configs / "personas" / "ayane"
    persona_yaml = yaml.safe_load((persona_dir / "persona.yaml").read_text(encoding="utf-8"))
    persona_yaml["prompts"] = {"system": "お嬢様として答えて。",
                               "system_rag": "お嬢様として答えて。参考:\n{context}"}
    (persona_dir / "persona.yaml").write_text(yaml.safe_dump(persona_yaml, allow_unicode=True),
                                              encoding="utf-8")
    facts = {f.id: f for f in load_jsonl(CONFIGS / "personas" / "ayane" / "knowledge.jsonl",
                                         KnowledgeFact)}
    (persona_dir / "knowledge.jsonl").write_text("".join(
        json.dumps({"id": i, "topic": facts[i].topic, "text": facts[i].text},
                   ensure_ascii=False) + "\n" for i in TINY_FACTS), encoding="utf-8")
    named = {"t000": ["k001"], "t001": ["k059"], "t002": ["k027"], "t003": ["k033"],
             "t005": ["k104"], "t007": ["k010"], "t009": ["k013"], "t011": ["k074"]}
    rows = [{**d, **({"knowledge_ids": named[d["id"]]} if d["id"] in named else {})}
            for d in DIALOGUES]
    (persona_dir / "dialogues.jsonl").write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return train_configs


def run_job(configs, tmp_path, **changes):
    cfg = parse_job(train_job(**changes), "test")
    ctx = JobContext.create(Workspace.load(configs), tmp_path / "run")
    return list(get_job("train").run(cfg, ctx)), ctx


def test_the_job_trains_the_share_on_the_retrieval_prompt(rag_configs, tmp_path):
    events, ctx = run_job(rag_configs, tmp_path, rag_share=0.5, rag_k=2, eval_questions=0)
    assert events[-1].type == "done", events[-1]
    stages = [e.stage for e in events if e.type == "stage"]
    assert stages[:3] == ["data", "rag", "model"]
    logs = [e.message for e in events if e.type == "log"]
    assert any(m.startswith("retrieval: persona ayane was not indexed; indexed") for m in logs)
    line = next(m for m in logs if m.startswith("retrieval prompt: "))
    assert line.startswith("retrieval prompt: 6 of 12 conversations (share 0.5, k 2); ")
    metrics = {e.name: e.value for e in events if e.type == "metric"}
    summary = events[-1].summary["rag"]
    assert metrics["rag_examples"] == summary["examples"] == 6
    assert summary["gold_retrieved"] + summary["gold_inserted"] == summary["naming_facts"]
    assert metrics["rag_gold_inserted"] == summary["gold_inserted"]
    # the conversations as trained, retrieval prompts and fact ids in them
    written = [json.loads(line) for line in (ctx.home / "runs" / "tiny-train" /
                                             "data.prepared.jsonl").read_text().splitlines()]
    with_rag = [r for r in written if "rag" in r]
    assert len(with_rag) == 6 and [r["id"] for r in with_rag] == [
        DIALOGUES[i]["id"] for i in rag.choose(12, 0.5, seed=0)]
    for row in with_rag:
        assert row["messages"][0]["role"] == "system" and len(row["rag"]["facts"]) == 2
        assert "{context}" not in row["messages"][0]["content"]
        assert set(row.get("knowledge_ids", [])) <= set(row["rag"]["facts"])
    assert all(r["messages"][0]["role"] == "user" for r in written if "rag" not in r)


def test_no_share_no_stage_and_no_index(rag_configs, tmp_path):
    cfg, ctx = parse_job(train_job(), "test"), JobContext.create(Workspace.load(rag_configs),
                                                                 tmp_path / "run")
    rows = [dict(d) for d in DIALOGUES]
    stage = job.rag_prompts(cfg, ctx, ctx.workspace.persona("ayane"), rows, tmp_path, {})
    with pytest.raises(StopIteration) as stop:
        next(stage)
    assert stop.value.value is rows and ctx.store.knowledge_dim() is None


class FakeExample:
    def __init__(self, ids):
        self.ids = ids

    def as_row(self):
        return {"input_ids": self.ids, "labels": self.ids}


def fingerprint_changes(tmp_path, first: dict, second: dict) -> list[str]:
    """The warnings of find_checkpoint when a complete checkpoint of a run with `first`
    settings meets a run with `second` (same tokens)."""
    data = job.Tokenised("base", None, None, "", "", 0,
                         [FakeExample([1, 2, 3]), FakeExample([4, 5])], [0], [1])
    for n, changes in enumerate((first, second)):
        cfg = parse_job(train_job(**changes), "test")
        events = list(job.find_checkpoint(cfg, data, tmp_path, {}))
        if n == 0:
            (tmp_path / "checkpoints" / "checkpoint-2").mkdir()
            (tmp_path / "checkpoints" / "checkpoint-2" / COMPLETE).write_text("{}")
    return [e.message for e in events if e.level == "warning"]


def test_the_checkpoint_fingerprint_follows_the_share(tmp_path):
    assert fingerprint_changes(tmp_path / "a", {}, {}) == []  # same run: resumed
    moved = fingerprint_changes(tmp_path / "b", {}, {"rag_share": 0.5})
    assert moved and moved[0].startswith("the data or settings changed")
    assert fingerprint_changes(tmp_path / "c", {"rag_share": 0.5}, {"rag_share": 0.3})
    assert fingerprint_changes(tmp_path / "d", {"rag_share": 0.5, "rag_k": 5},
                               {"rag_share": 0.5, "rag_k": 3})
    assert fingerprint_changes(tmp_path / "e", {"rag_share": 0.5},
                               {"rag_share": 0.5, "rag_keep_plain": True})


@pytest.mark.parametrize(("changes", "key"), [
    ({"rag_share": 1.5}, "rag_share"), ({"rag_share": -0.1}, "rag_share"),
    ({"rag_share": "half"}, "rag_share"), ({"rag_k": 0}, "rag_k"),
    ({"rag_share": 0.5, "system_prompt": False}, "rag_share"),
])
def test_bad_values_are_one_line_config_errors(changes, key):
    with pytest.raises(ConfigError) as caught:
        parse_job(train_job(**changes), "job.yaml")
    message = str(caught.value)
    assert message.startswith("job.yaml: ") and key in message and "\n" not in message


def test_rag_k_defaults_to_chats_k():
    chats = inspect.signature(Retriever).parameters["k"].default  # find_retriever's k
    assert TrainJob.model_fields["rag_k"].default == chats
