"""Retrieval quality and speed (issue: chat engine, item 5; issue 17).

1. recall@5 (per question: the share of its labelled fact ids in the top 5; then the mean)
   on two sets: the persona's eval questions that list facts (written with the facts: they
   share their words; goal >= 0.95) and the held-out paraphrase set (paraphrases.jsonl:
   no content word shared with the answering facts; goal >= 0.90). Never tuned on.
2. p50 / p95 latency per query (embedding included) on 10,000 facts: the persona's real
   facts plus synthetic filler in the same persona, so they compete. Goals < 20 / < 40 ms.

Measured side by side in the same run, on the same store:
- the old design (baseline): n-gram full text + e5 vectors, RRF (on the same table, so
  its vectors include the facts' asks once they have any);
- the new design: e5 vectors (the fact's text and its asks) + the word index (Sudachi's
  normalised content words and synonym groups, BM25 in memory), n-grams only where a
  question has no analysable word;
- the new design with fugashi + unidic-lite as its analyser instead of Sudachi;
- for reference, the vectors alone (no full-text list).

Run: .venv/bin/python bench/retrieval.py [--persona ayane] [--total 10000]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipelines.config import KnowledgeFact
from pipelines.retrieval import DEFAULT_EMBEDDER, Retriever, analysis, get_embedder, index_persona
from pipelines.workspace import Workspace
from store import Store

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


def recall_at_5(retriever: Retriever, questions: list[tuple[str, list[str]]]) -> float:
    """Aggregate only: the paraphrase set is held out, its misses are not printed."""
    scores = []
    for question, need in questions:
        got = {h.fact_id for h in retriever.search(question, k=5)}
        scores.append(len(got & set(need)) / len(need))
    return statistics.mean(scores)


def timed(fn, queries, repeat: int = 3) -> list[float]:
    out = []
    for _ in range(repeat):
        for q in queries:
            t = time.perf_counter()
            fn(q)
            out.append((time.perf_counter() - t) * 1000)
    return out


def p50_p95(ms: list[float], digits: int = 1) -> str:
    return (f"p50 {statistics.median(ms):.{digits}f} ms, "
            f"p95 {statistics.quantiles(ms, n=20)[-1]:.{digits}f} ms")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--persona", default="ayane")
    ap.add_argument("--total", type=int, default=10_000)
    ap.add_argument("--embedder", default=DEFAULT_EMBEDDER)
    args = ap.parse_args()
    ws = Workspace.load()
    data = ws.persona_data(args.persona)
    sets = {
        "existing": [(q.question, q.knowledge_ids) for q in data.eval if q.knowledge_ids],
        "paraphrase": [(r["question"], r["knowledge_ids"]) for r in map(json.loads, (
            ws.persona_dir(args.persona) / "paraphrases.jsonl").read_text(
                encoding="utf-8").splitlines()) if r],
    }
    asks = sum(bool(f.asks) for f in data.knowledge)
    embedder = get_embedder(args.embedder)
    print(f"embedder: {embedder.name}; {len(data.knowledge)} facts, {asks} with asks; "
          f"{len(sets['existing'])} existing, {len(sets['paraphrase'])} paraphrase questions")
    designs = {  # name: (analyser, Retriever options)
        "old (n-gram + vectors)": (analysis.ANALYSER, {"ngrams": True, "words": False}),
        "new, Sudachi": (analysis.ANALYSER, {}),
        "new, fugashi + unidic-lite": (analysis.FUGASHI, {}),
        # what the full-text lists cost or add: no full text at all
        "reference: vectors alone": (analysis.ANALYSER, {"ngrams": False, "words": False}),
    }
    extra = filler(args.total - len(data.knowledge))
    queries = [q for qs in sets.values() for q, _ in qs]
    results: dict[str, dict[str, str]] = {name: {} for name in designs}
    retrievers: dict[str, Retriever] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for analyser in (analysis.ANALYSER, analysis.FUGASHI):  # one store per analyser
            analysis.use(analyser)
            analysis.terms("準備")  # load the dictionary outside the timings
            per_query = timed(analysis.terms, queries, repeat=1)
            print(f"analysis of a question alone ({analyser}): {p50_p95(per_query, 2)}")
            store = Store.open(Path(tmp) / analyser)
            index_persona(store, args.persona, data.knowledge, embedder)
            mine = [name for name, (a, _) in designs.items() if a == analyser]
            for name in mine:
                r = Retriever(store, args.persona, embedder, analyser=analyser,
                              **designs[name][1])
                results[name].update({s: f"{recall_at_5(r, qs):.3f}" for s, qs in sets.items()})
                r.close()
            t = time.perf_counter()
            index_persona(store, args.persona, list(data.knowledge) + extra, embedder)
            print(f"indexed {args.total} facts in {time.perf_counter() - t:.0f} s")
            for name in mine:
                r = retrievers[name] = Retriever(store, args.persona, embedder,
                                                 analyser=analyser, **designs[name][1])
                r.search(queries[0])  # load the vectors and words once, as the console does
                for s, qs in sets.items():
                    results[name][f"{s} @{args.total}"] = f"{recall_at_5(r, qs):.3f}"
        analysis.use(analysis.ANALYSER)
        # Latency: the designs take turns query by query (3 rounds), so that other
        # tenants' load falls on all of them alike.
        times: dict[str, list[float]] = {name: [] for name in retrievers}
        for _ in range(3):
            for q in queries:
                for name, r in retrievers.items():
                    t = time.perf_counter()
                    r.search(q)
                    times[name].append((time.perf_counter() - t) * 1000)
        for name, r in retrievers.items():
            results[name]["latency"] = p50_p95(times[name])
            r.close()
    print(f"load average after measuring: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores "
          "(other tenants included)")
    print(f"goals: recall@5 existing >= 0.95, paraphrase >= 0.90; p50 < 20 ms, p95 < 40 ms "
          f"on {args.total} facts")
    for name, row in results.items():
        print(f"{name}:")
        for key, value in row.items():
            print(f"  {key}: {value}")


if __name__ == "__main__":
    main()
