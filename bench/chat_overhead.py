"""What the chat session costs on top of bare llama-cpp-python (chat engine issue, item 8).

Same model (the embedded Gemma 3 270M GGUF), same prompt text, greedy, same number of
tokens; alternating runs, llama.cpp's prefix cache reset before each so both do the same
prefill. The session arm has retrieval on and logs both turns to a LanceDB store.

Prints: tokens/s ratio session/bare (goal >= 0.95) and time to first token added by the
session, p50 (goal <= 30 ms), with the parts: retrieval, store writes, render.

Run: .venv/bin/python bench/chat_overhead.py [--runs 10] [--tokens 48]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipelines.chat import ChatSession, TurnDone
from pipelines.inference import Delta, GenerationOptions
from pipelines.inference.registry import load_backend
from pipelines.retrieval import Retriever, get_embedder, index_persona
from pipelines.workspace import Workspace
from store import Store

QUESTIONS = ["好きなミュージカルは何ですか？", "飼っている犬の名前を教えて。",
             "お兄さんはどこにいるの？", "休日は何をして過ごしますか？"]


def bare_run(llm, prompt: str, tokens: int) -> tuple[float, float]:
    """(ttft seconds, tokens/s) for llama-cpp-python alone on an already rendered prompt."""
    llm.reset()
    started = time.perf_counter()
    ids = llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
    first = None
    n = 0
    for _ in llm.generate(ids, temp=0.0, top_k=64, top_p=0.95, min_p=0.0, repeat_penalty=1.0):
        first = first or time.perf_counter()
        n += 1
        if n >= tokens:
            break
    ended = time.perf_counter()
    return first - started, (n - 1) / (ended - first)


def session_run(session: ChatSession, llm, question: str, tokens: int):
    llm.reset()
    options = GenerationOptions(max_new_tokens=tokens, temperature=0.0)
    started = time.perf_counter()
    first = None
    final = done = None
    for event in session.send(question, options):
        if isinstance(event, Delta) and not event.done and first is None:
            first = time.perf_counter()
        elif isinstance(event, Delta) and event.done:
            final = event
        elif isinstance(event, TurnDone):
            done = event.message
    return first - started, final, done


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--tokens", type=int, default=48)
    args = ap.parse_args()
    ws = Workspace.load()
    data = ws.persona_data("ayane")
    variant = ws.variant("gemma3-270m")
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        store = Store.open(home / "store")
        embedder = get_embedder(home=ws.settings.home_path())  # the default, e5-onnx
        index_persona(store, "ayane", data.knowledge, embedder)
        backend = load_backend(variant, ws.settings.home_path())
        llm = backend.llm
        session = ChatSession(store=store, persona=data.persona, variant=variant,
                              backend=backend, retriever=Retriever(store, "ayane", embedder),
                              rag=True, history_turns=0)
        session_run(session, llm, QUESTIONS[0], 4)  # warm-up: first load of vectors etc.
        bare_ttft, bare_tps, ses_ttft, ses_tps, retrieval = [], [], [], [], []
        for i in range(args.runs):
            q = QUESTIONS[i % len(QUESTIONS)]
            ttft, final, row = session_run(session, llm, q, args.tokens)
            # the engine's own ttft counts from its stream() call; the session's from send()
            ses_ttft.append(ttft)
            ses_tps.append(final.tokens_per_s)
            retrieval.append(json.loads(row["options_json"]).get("retrieval_ms", 0.0))
            b_ttft, b_tps = bare_run(llm, row["rendered_prompt"], args.tokens)
            bare_ttft.append(b_ttft)
            bare_tps.append(b_tps)
        added = [(s - b) * 1000 for s, b in zip(ses_ttft, bare_ttft, strict=True)]
        ratio = statistics.median(ses_tps) / statistics.median(bare_tps)
        print(f"runs {args.runs}, {args.tokens} tokens each, retrieval on, store logging on")
        print(f"bare llama-cpp-python: ttft p50 {statistics.median(bare_ttft) * 1000:.1f} ms, "
              f"{statistics.median(bare_tps):.1f} tok/s")
        print(f"chat session:          ttft p50 {statistics.median(ses_ttft) * 1000:.1f} ms, "
              f"{statistics.median(ses_tps):.1f} tok/s")
        print(f"tokens/s ratio session/bare: {ratio:.3f} (goal >= 0.95)")
        print(f"added time to first token: p50 {statistics.median(added):.1f} ms "
              f"(goal <= 30 ms); of which retrieval p50 {statistics.median(retrieval):.1f} ms")
        backend.close()


if __name__ == "__main__":
    main()
