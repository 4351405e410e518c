"""Should every job process run with OMP_WAIT_POLICY=PASSIVE (OpenMP threads that sleep while
they wait), as the train and prefer jobs already do?

Both engines kyara's jobs compute with use OpenMP: torch (the evolve, merge and eval jobs on
Hugging Face models) and llama.cpp's CPU backend (libggml-cpu links libgomp; the eval job on
GGUF variants, the console's chat worker). OpenMP reads the variable once, when it loads, so
each measurement is a fresh process with the environment set before any import.

Workloads, each with every usable core as kyara gives them:
  torch   greedy `generate` of a tiny random Gemma-2 (the evolve job's candidate eval)
  train   a training step of it (forward, backward, AdamW; batch 4 x 64 tokens)
  train-270m  the same on a random model of Gemma 3 270M's shape (vocabulary 32k; 4 x 128)
  llama   greedy decode of the Gemma 3 270M GGUF (the eval job, the chat)
Conditions: the machine as it is ("quiet"), and with one core taken by a busy process
("loaded": the console's chat or another job). The baseline is the environment a user has
by hand (neither variable set), measured in the same run, interleaved with the other arms;
each arm's figure is its speed against it (>1: faster).

Run: .venv/bin/python bench/omp_wait.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, os, sys, time
kind, model = sys.argv[1], sys.argv[2]
threads = len(os.sched_getaffinity(0))
if kind == "torch":
    import torch
    from transformers import AutoModelForCausalLM
    torch.set_num_threads(threads)
    m = AutoModelForCausalLM.from_pretrained(model).eval()
    ids = torch.tensor([[2] + list(range(10, 40))])
    def once():
        with torch.no_grad():
            m.generate(ids, max_new_tokens=24, min_new_tokens=24, do_sample=False)
    reps = 8
elif kind in ("train", "train-270m"):
    import torch
    from transformers import AutoModelForCausalLM
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_pretrained(model).train()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
    batch = torch.randint(10, 8000, (4, 64) if kind == "train" else (4, 128))
    def once():
        loss = m(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    reps = 4
else:
    from llama_cpp import Llama
    llm = Llama(model_path=model, n_ctx=512, n_threads=threads, n_threads_batch=threads,
                verbose=False)
    prompt = llm.tokenize("<start_of_turn>user\nこんにちは、自己紹介して。<end_of_turn>\n"
                          "<start_of_turn>model\n".encode(), add_bos=True, special=True)
    def once():
        llm.reset()
        for i, _ in enumerate(llm.generate(prompt, temp=0.0)):
            if i == 47:
                break
    reps = 4
once()  # warm-up
t = time.perf_counter()
for _ in range(reps):
    once()
print(json.dumps({"s_per_rep": (time.perf_counter() - t) / reps, "threads": threads}))
"""

SPIN = "import time\nwhile True:\n    pass\n"


def torch_model(folder: Path, **shape: int) -> str:
    import torch
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    Gemma2ForCausalLM(Gemma2Config(max_position_embeddings=512, **shape)).save_pretrained(folder)
    return str(folder)


TINY = dict(vocab_size=8000, hidden_size=512, intermediate_size=1536, num_hidden_layers=6,
            num_attention_heads=8, num_key_value_heads=4, head_dim=64)
SHAPE_270M = dict(vocab_size=32000, hidden_size=640, intermediate_size=2048,
                  num_hidden_layers=18, num_attention_heads=4, num_key_value_heads=1,
                  head_dim=256)


def gguf_model(folder: Path) -> str:
    sys.path.insert(0, str(ROOT))
    from pipelines.inference.embedded import ensure_embedded

    return str(ensure_embedded("gemma3-270m", folder))


# the environment of each arm: OpenMP's default (spin a while, then sleep), PASSIVE (sleep at
# once), and libgomp's spin shortened (GOMP_SPINCOUNT; the default is 300,000 iterations)
ARMS = {"unset": {}, "PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
        "spin 10k": {"GOMP_SPINCOUNT": "10000"}}


def measure(kind: str, model: str, arm: str) -> float:
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(ARMS[arm])
    done = subprocess.run([sys.executable, "-c", CHILD, kind, model], env=env,
                          capture_output=True, text=True, check=True, timeout=900)
    return float(json.loads(done.stdout.strip().splitlines()[-1])["s_per_rep"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--kinds", default="torch,train,llama,train-270m")
    args = ap.parse_args()
    kinds = args.kinds.split(",")
    print(f"usable cores {len(os.sched_getaffinity(0))}, load {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory() as tmp:
        built: dict[str, str] = {}  # one model per shape, shared by the kinds on it

        def model_for(kind: str) -> str:
            shape = "gguf" if kind == "llama" else "270m" if kind == "train-270m" else "tiny"
            if shape not in built:
                built[shape] = (gguf_model(Path(tmp)) if shape == "gguf" else torch_model(
                    Path(tmp) / shape, **(SHAPE_270M if shape == "270m" else TINY)))
            return built[shape]

        models = {kind: model_for(kind) for kind in kinds}
        for condition in ("quiet", "loaded"):
            spinner = (subprocess.Popen([sys.executable, "-c", SPIN])
                       if condition == "loaded" else None)
            try:
                for kind, model in models.items():
                    times: dict[str, list[float]] = {arm: [] for arm in ARMS}
                    for _ in range(args.rounds):  # interleaved, so drift hits every arm alike
                        for arm in ARMS:
                            times[arm].append(measure(kind, model, arm))
                    median = {arm: statistics.median(t) for arm, t in times.items()}
                    print(f"{condition:6} {kind:5} s/rep " + "; ".join(
                        f"{arm} {median[arm]:.3f} {[round(x, 3) for x in times[arm]]} "
                        f"({median['unset'] / median[arm]:.2f}x)" for arm in ARMS), flush=True)
            finally:
                if spinner is not None:
                    spinner.kill()
                    spinner.wait()
    print(f"load after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
