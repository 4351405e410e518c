"""The chat session: every turn logged, the user's message before generation, a reply cut
short kept as incomplete, failures stored as errors with the user's message intact."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence

import pytest

from pipelines.chat import ChatSession, Retrieved, TurnDone
from pipelines.inference.base import BackendError, Delta, GenerationOptions
from pipelines.pool import BackendPool
from pipelines.prompting import render_prompt
from pipelines.workspace import Workspace
from store import Store
from tests.conftest import CONFIGS


class ScriptedBackend:
    """A ChatBackend that replays queued replies (the simonw/llm mock-model pattern) and
    records what it was asked and what the store held when generation began."""

    name = "scripted"

    def __init__(self, store: Store | None = None) -> None:
        self.queue: list[list[str] | Exception] = []
        self.calls: list[list[dict]] = []
        self.store = store
        self.rows_at_start: list[list[dict]] = []
        self.produced = 0
        self.closed_streams = 0

    def enqueue(self, reply: list[str] | Exception) -> None:
        self.queue.append(reply)

    def render(self, messages: Sequence[dict]) -> str:
        return render_prompt("gemma", messages, bos_token="<bos>")

    def stream(self, messages, options: GenerationOptions) -> Iterator[Delta]:
        self.calls.append([dict(m) for m in messages])
        if self.store is not None:
            self.rows_at_start.append(self.store.rows("messages"))
        reply = self.queue.pop(0)
        try:
            if isinstance(reply, Exception):
                raise reply
            for piece in reply:
                self.produced += 1
                yield Delta(text=piece)
            yield Delta(done=True, stop_reason="eos", stop_token="<end_of_turn>",
                        prompt_tokens=12, completion_tokens=len(reply), ttft_s=0.01,
                        tokens_per_s=50.0)
        finally:
            self.closed_streams += 1

    def close(self) -> None:
        pass


@pytest.fixture
def ws():
    return Workspace.load(CONFIGS)


@pytest.fixture
def store(tmp_path):
    return Store.open(tmp_path / "store")


def make_session(ws, store, backend, **kw):
    return ChatSession(store=store, persona=ws.persona("ayane"),
                       variant=ws.variant("gemma3-270m"), backend=backend, **kw)


def test_turn_logged_with_everything_that_produced_it(ws, store):
    backend = ScriptedBackend(store)
    backend.enqueue(["ごきげんよう", "、絢音", "ですわ。"])
    session = make_session(ws, store, backend)
    events = list(session.send("こんにちは"))
    text = "".join(e.text for e in events if isinstance(e, Delta) and not e.done)
    assert text == "ごきげんよう、絢音ですわ。"
    assert isinstance(events[-1], TurnDone)
    assert events[-1].message["session_id"] == session.session_id
    assert store.get("messages", events[-1].message["id"])["content"] == text
    # the user's message was in the store before generation started
    assert [r["content"] for r in backend.rows_at_start[0]] == ["こんにちは"]
    rows = session.messages()
    assert [(r["role"], r["status"], r["seq"]) for r in rows] == [
        ("user", "complete", 0), ("assistant", "complete", 1)]
    reply = rows[1]
    assert reply["content"] == text and reply["variant"] == "gemma3-270m"
    assert reply["stop_reason"] == "eos" and reply["completion_tokens"] == 3
    assert reply["tokens_per_s"] == 50.0 and reply["ttft_ms"] == pytest.approx(10.0)
    assert reply["rag"] is False and reply["retrieved_ids"] is None
    assert reply["rendered_prompt"].startswith("<bos><start_of_turn>user\nお嬢様のように")
    extra = json.loads(reply["options_json"])
    assert extra["stop_token"] == "<end_of_turn>" and extra["options"]["max_new_tokens"] == 64
    session_row = store.get("sessions", session.session_id)
    assert session_row["persona"] == "ayane" and session_row["title"] == "こんにちは"


def test_cancel_keeps_the_partial_reply_as_incomplete(ws, store):
    backend = ScriptedBackend()
    backend.enqueue(["わたくし", "は", "レオ", "と", "散歩", "ですわ。"])
    session = make_session(ws, store, backend)
    stream = session.send("週末は？")
    seen = [next(stream), next(stream)]  # the user reads two pieces, then presses Escape
    stream.close()
    assert backend.closed_streams == 1  # generation was stopped, not left running
    assert backend.produced <= 3
    rows = session.messages()
    assert rows[-1]["status"] == "incomplete" and rows[-1]["stop_reason"] == "cancel"
    assert rows[-1]["content"] == "".join(d.text for d in seen) == "わたくしは"


def test_backend_error_keeps_the_user_message(ws, store):
    backend = ScriptedBackend()
    backend.enqueue(BackendError("prompt is 3000 tokens, the context window is 2048"))
    session = make_session(ws, store, backend)
    events = list(session.send("長い質問"))
    assert isinstance(events[-1], TurnDone) and events[-1].message["status"] == "error"
    rows = session.messages()
    assert rows[0]["role"] == "user" and rows[0]["content"] == "長い質問"
    assert rows[1]["status"] == "error" and "context window" in rows[1]["error"]


def test_history_carries_earlier_turns_and_skips_failed_ones(ws, store):
    backend = ScriptedBackend()
    backend.enqueue(["一つ目ですわ。"])
    backend.enqueue(BackendError("boom"))
    backend.enqueue(["三つ目ですわ。"])
    session = make_session(ws, store, backend)
    list(session.send("一"))
    list(session.send("二"))
    list(session.send("三"))
    last = backend.calls[-1]
    assert [m["role"] for m in last] == ["system", "user", "assistant", "user"]
    assert last[1]["content"] == "一" and last[2]["content"] == "一つ目ですわ。"
    assert last[3]["content"] == "三"


def test_resume_continues_the_same_session(ws, store):
    backend = ScriptedBackend()
    backend.enqueue(["はい。"])
    first = make_session(ws, store, backend)
    list(first.send("一"))
    backend.enqueue(["また、ですわ。"])
    again = ChatSession.resume(store, first.session_id, persona=first.persona,
                               variant=first.variant, backend=backend)
    list(again.send("二"))
    assert [r["seq"] for r in again.messages()] == [0, 1, 2, 3]
    assert backend.calls[-1][-2]["content"] == "はい。"
    with pytest.raises(BackendError, match="no session"):
        ChatSession.resume(store, "missing", persona=first.persona, variant=first.variant,
                           backend=backend)


class FixedRetriever:
    def __init__(self, hits):
        self.hits = hits

    def search(self, query, k=None):
        return self.hits


def test_retrieval_puts_facts_in_the_prompt_and_logs_their_ids(ws, store):
    from pipelines.retrieval import Hit

    hits = [Hit(fact_id="k027", text="絢音の愛犬はレオである。", topic="pets", score=0.03,
                text_rank=1, vector_rank=2)]
    backend = ScriptedBackend()
    backend.enqueue(["レオですわ。"])
    session = make_session(ws, store, backend, retriever=FixedRetriever(hits), rag=True)
    events = list(session.send("犬の名前は？"))
    assert isinstance(events[0], Retrieved) and events[0].hits == hits
    system = backend.calls[0][0]
    assert system["role"] == "system" and system["content"].endswith("- 絢音の愛犬はレオである。")
    reply = session.messages()[-1]
    assert reply["rag"] is True and reply["retrieved_ids"] == ["k027"]


def test_rag_without_index_is_an_error_turn_not_a_crash(ws, store):
    session = make_session(ws, store, ScriptedBackend(), rag=True)
    events = list(session.send("犬は？"))
    assert events[-1].message["status"] == "error"
    assert "kyara index ayane" in events[-1].message["error"]
    assert session.messages()[0]["content"] == "犬は？"


def test_backend_loaded_lazily_after_the_question_is_stored(ws, store):
    calls = []

    def loader(variant):
        calls.append(store.rows("messages"))
        raise BackendError("variant 'x': model file not found: /nowhere.gguf")

    session = make_session(ws, store, None, pool=BackendPool(loader))
    events = list(session.send("こんにちは"))
    assert [r["content"] for r in calls[0]] == ["こんにちは"]  # stored before loading
    assert events[-1].message["status"] == "error"
    assert "model file not found" in events[-1].message["error"]
    # a later send tries to load again (the user may have fixed the path meanwhile)
    list(session.send("もう一度"))
    assert len(calls) == 2


def test_compare_asks_once_and_answers_per_combination(ws, store, tmp_path):
    from pipelines.chat import Combo, compare, default_combos

    variants = {n: ws.variant(n) for n in ("gemma3-270m", "gemma-2-2b-jpn-it",
                                           "gemma-2-2b-jpn-it-ayane")}
    for folder in ("base", "adapter"):  # the tuned variant is one this machine can load
        (tmp_path / folder).mkdir()
    for name in ("gemma-2-2b-jpn-it", "gemma-2-2b-jpn-it-ayane"):
        variants[name].model = str(tmp_path / "base")
    variants["gemma-2-2b-jpn-it-ayane"].adapter = str(tmp_path / "adapter")
    combos = default_combos(variants, variants["gemma-2-2b-jpn-it"], rag_available=True)
    assert [c.label for c in combos] == [
        "gemma-2-2b-jpn-it · RAG off", "gemma-2-2b-jpn-it · RAG on",
        "gemma-2-2b-jpn-it-ayane · RAG off", "gemma-2-2b-jpn-it-ayane · RAG on"]
    assert len(default_combos(variants, variants["gemma3-270m"], False)) == 2
    with pytest.raises(BackendError, match="unknown variant 'nope'"):
        default_combos(variants, variants["gemma3-270m"], True, ["nope+rag"])

    from pipelines.retrieval import Hit

    hit = Hit(fact_id="k027", text="絢音の愛犬はレオである。", topic="pets", score=0.03,
              text_rank=1, vector_rank=1)
    loaded = []

    def loader(v):
        loaded.append(v.name)
        b = ScriptedBackend()
        b.enqueue([f"{v.name}ですわ。"])
        b.enqueue([f"{v.name}ですわ。"])
        return b

    session = ChatSession(store=store, persona=ws.persona("ayane"), variant=combos[0].variant,
                          pool=BackendPool(loader), retriever=FixedRetriever([hit]),
                          kind="compare")
    events = list(compare(session, "犬の名前は？", combos))
    assert loaded == ["gemma-2-2b-jpn-it", "gemma-2-2b-jpn-it-ayane"]  # each loaded once
    rows = session.messages()
    assert [r["role"] for r in rows] == ["user"] + ["assistant"] * 4
    assert [(r["variant"], r["rag"]) for r in rows[1:]] == [
        (c.variant.name, c.rag) for c in combos]
    assert rows[2]["retrieved_ids"] == ["k027"] and rows[1]["retrieved_ids"] is None
    assert {i for i, _ in events} == {0, 1, 2, 3}
    assert store.get("sessions", session.session_id)["kind"] == "compare"
    assert Combo(combos[0].variant, True).label.endswith("RAG on")


def test_default_compare_set_skips_a_variant_this_machine_cannot_load(ws, tmp_path,
                                                                      monkeypatch):
    """A cheap look (no model loaded, no torch): a missing adapter, model folder or LoRA
    file, a hub model not in the local cache, `device: cuda` with no GPU visible and an
    OpenAI variant with no key are each passed over, with the reason; the shipped Ayane
    adapter on the embedded GGUF is taken."""
    from pipelines.chat import default_combos, unloadable

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    (tmp_path / "base").mkdir()
    (tmp_path / "adapter").mkdir()
    base = ws.variant("gemma-2-2b-jpn-it").model_copy(update={"model": str(tmp_path / "base")})

    def hf(name, **changes):
        return base.model_copy(update={"name": name, "adapter": str(tmp_path / "adapter"),
                                       **changes})

    candidates = [
        hf("no-adapter", adapter=str(tmp_path / "runs" / "gone" / "adapter")),
        hf("no-model", model=str(tmp_path / "nowhere")),
        hf("needs-cuda", device="cuda"),
        hf("needs-cuda-4bit", load_in_4bit=True),
        hf("not-cached", model="kyara-tests/no-such-model"),
        ws.variant("ayane-270m").model_copy(update={"name": "lora-gone",
                                                    "lora_path": str(tmp_path / "x.gguf")}),
        ws.variant("ayane-270m"),  # the embedded GGUF + the adapter shipped in configs/
        hf("also-fine"),
    ]
    reasons = {v.name: unloadable(v, tmp_path / "home") for v in candidates}
    assert reasons == {
        "no-adapter": f"variant 'no-adapter': adapter directory not found: "
                      f"{tmp_path / 'runs' / 'gone' / 'adapter'}",
        "no-model": f"variant 'no-model': model folder not found: {tmp_path / 'nowhere'}",
        "needs-cuda": "variant 'needs-cuda': device: cuda needs a CUDA GPU and none is visible",
        "needs-cuda-4bit": "variant 'needs-cuda-4bit': load_in_4bit needs a CUDA GPU and "
                           "none is visible",
        "not-cached": "variant 'not-cached': model kyara-tests/no-such-model is not in the "
                      "local Hugging Face cache",
        "lora-gone": f"variant 'lora-gone': LoRA file not found: {tmp_path / 'x.gguf'}",
        "ayane-270m": None,
        "also-fine": None,
    }
    assert unloadable(ws.variant("openai-gpt-4o-mini")) == (
        "variant 'openai-gpt-4o-mini': set OPENAI_API_KEY (the OpenAI API key)")
    # the dequantised 270M folder under the home is made on first use: loadable
    assert unloadable(ws.variant("gemma3-270m-hf"), tmp_path / "home") is None

    variants = {base.name: base, **{v.name: v for v in candidates}}
    combos = default_combos(variants, base, rag_available=True)
    assert [c.label for c in combos] == [
        "gemma-2-2b-jpn-it · RAG off", "gemma-2-2b-jpn-it · RAG on",
        "ayane-270m · RAG off", "ayane-270m · RAG on"]
    # signature as before; the home, when given, places relative paths
    assert default_combos(variants, base, False, home=tmp_path / "home")[1].variant.name == (
        "ayane-270m")
    # nothing loadable to compare with: the current variant alone
    only_bad = {base.name: base, "no-adapter": candidates[0]}
    assert [c.label for c in default_combos(only_bad, base, False)] == [
        "gemma-2-2b-jpn-it · RAG off"]
    # a configured compare set is taken as written (its panes say why one fails)
    assert [c.variant.name for c in default_combos(variants, base, False, ["no-adapter"])] == [
        "no-adapter"]


def test_with_retrieval_the_question_is_stored_before_generation_even_when_slow(
        ws, store, monkeypatch):
    """The question is written while the facts are retrieved, never after generation
    starts: a write slower than the retrieval is waited for."""
    import time

    from pipelines.retrieval import Hit

    upsert = store.upsert

    def slow_upsert(table, rows):
        time.sleep(0.3 if table == "messages" else 0)
        upsert(table, rows)

    monkeypatch.setattr(store, "upsert", slow_upsert)
    hits = [Hit(fact_id="k027", text="絢音の愛犬はレオである。", topic="pets", score=0.03,
                text_rank=1, vector_rank=2)]
    backend = ScriptedBackend(store)
    backend.enqueue(["レオですわ。"])
    session = make_session(ws, store, backend, retriever=FixedRetriever(hits), rag=True)
    list(session.send("犬の名前は？"))
    assert [r["content"] for r in backend.rows_at_start[0]] == ["犬の名前は？"]


def test_a_failing_retrieval_still_keeps_the_question(ws, store):
    class Broken:
        def search(self, query, k=None):
            raise RuntimeError("index damaged")

    session = make_session(ws, store, ScriptedBackend(), retriever=Broken(), rag=True)
    with pytest.raises(RuntimeError, match="index damaged"):
        list(session.send("犬は？"))
    assert [r["content"] for r in session.messages()] == ["犬は？"]


def test_the_markdown_export_is_the_conversation_as_it_continued(ws, store):
    """ctrl+o's Markdown: each turn's chosen reply in the transcript (a chosen alternative,
    an edited text), the replies not chosen and the edit's original under it, the person's
    ratings beside the judge's."""
    from pipelines import feedback
    from pipelines.export_md import session_markdown

    backend = ScriptedBackend(store)
    for reply in (["一回目ですわ。"], ["二回目ですわ。"], ["次ですわ。"]):
        backend.enqueue(reply)
    session = make_session(ws, store, backend)
    list(session.send("最初の質問"))
    first = next(m for m in session.messages() if m["role"] == "assistant")
    list(session.regenerate(first["id"]))  # the second answer is now the chosen one
    list(session.send("次の質問"))
    nxt = [m for m in session.messages() if m["role"] == "assistant"][-1]
    edited = session.edit(nxt["id"], "直しましたわ。")
    feedback.record_label(store, edited["id"], "personality", 6)
    feedback.record_label(store, edited["id"], "thumbs", 1)

    text = session_markdown(session)
    transcript = [line for line in text.splitlines() if line.startswith("**")]
    assert transcript == ["**あなた**: 最初の質問", "**小野寺絢音**: 二回目ですわ。",
                          "**あなた**: 次の質問", "**小野寺絢音**: 直しましたわ。"]
    assert "> alternative not chosen, variant gemma3-270m: 一回目ですわ。" in text
    assert "> original, before your edit: 次ですわ。" in text
    assert "> you: personality 6, 👍" in text
    assert text.index("一回目ですわ。") > text.index("二回目ですわ。")  # under the chosen one
