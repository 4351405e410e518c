"""The baseline of bench/chat_overhead.py: llama-cpp-python as a user would write it by
hand, in its own process, sharing nothing with kyara: `Llama(...)` with every usable core,
the prompt text tokenised as it is (it carries its own <bos>), then `generate` greedily,
token by token, until the token budget or the end-of-turn token.

Reads one JSON request a line on stdin ({"prompt": ..., "tokens": N}), answers one JSON
line: time to first token and decode tokens/s measured here, and the text.

Run: python bench/bare_llama.py MODEL.gguf [--lora ADAPTER.gguf] [--n-ctx 2048]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from llama_cpp import Llama


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--lora")
    ap.add_argument("--n-ctx", type=int, default=2048)
    args = ap.parse_args()
    threads = len(os.sched_getaffinity(0))
    llm = Llama(model_path=args.model, lora_path=args.lora, n_ctx=args.n_ctx,
                n_threads=threads, n_threads_batch=threads, verbose=False)
    print(json.dumps({"ready": True, "n_threads": threads}), flush=True)
    stop = {llm.token_eos(), *llm.tokenize(b"<end_of_turn>", add_bos=False, special=True)}
    for line in sys.stdin:
        request = json.loads(line)
        started = time.perf_counter()
        ids = llm.tokenize(request["prompt"].encode("utf-8"), add_bos=False, special=True)
        first = last = None
        out: list[int] = []
        for token in llm.generate(ids, temp=0.0):
            if token in stop:
                break
            last = time.perf_counter()
            first = first or last
            out.append(token)
            if len(out) >= request["tokens"]:
                break
        # decode speed over the tokens with text, first to last (as the chat bench does)
        n = len(out)
        rate = (n - 1) / (last - first) if n > 1 and last > first else None
        print(json.dumps({"ttft_s": (first - started) if first else None, "tokens": n,
                          "tokens_per_s": rate,
                          "text": llm.detokenize(out).decode("utf-8", "replace")},
                         ensure_ascii=False), flush=True)

if __name__ == "__main__":
    main()
