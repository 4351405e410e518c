"""In-memory evolution on CPU: peak anonymous RSS while candidates are merged into the one
resident model and replies are generated, for K = 2, 3, 4 source models.

The sources stay memory-mapped (file-backed pages, reclaimable), so the anonymous memory
should be about one model (the resident one) plus the runtime, whatever K is. Goal (issue
7): peak anonymous RSS <= 1.5 x one model's size at K = 3.

    .venv/bin/python bench/evolve_memory.py [--layers 12] [--hidden 1024] [--dir DIR]

Random Llama-shaped models (bf16, ~0.4 GB each at the defaults) are written locally with
safetensors, no module init and no download. Each K runs in a fresh child process that
samples RssAnon from /proc/self/status every 2 ms; the judge is off (fitness = style
checks only) so no network is needed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def build_model(path: Path, seed: int, *, hidden: int, layers: int, vocab: int,
                intermediate: int, heads: int, kv_heads: int, tokenizer: Path) -> Path:
    """Random tensors straight to safetensors (the idea of tests/merge/models.py's
    make_model_fast, kept here: a bench does not import tests)."""
    import shutil

    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    if (path / "model.safetensors").is_file():
        return path
    config = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, vocab_size=vocab,
                         intermediate_size=intermediate, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, max_position_embeddings=2048,
                         tie_word_embeddings=False, dtype="bfloat16",
                         architectures=["LlamaForCausalLM"], bos_token_id=2, eos_token_id=1,
                         pad_token_id=0)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlamaForCausalLM(config).state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: (torch.randn(s, generator=gen) * 0.02).to(torch.bfloat16)
               for k, s in shapes.items()}
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    del tensors
    config.save_pretrained(path)
    for file in tokenizer.iterdir():
        shutil.copy(file, path / file.name)
    return path


def build_tokenizer(out: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if (out / "tokenizer_config.json").is_file():
        return out
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["こんにちは、絢音ですわ。", "紅茶がとても好きですの。",
                             "Hello there, how are you today?"] * 50, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>",
                                      eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    wrapped.chat_template = (
        "{{ bos_token }}{% for m in messages %}{{ '<start_of_turn>' + m['role'] + '\n' + "
        "m['content'] + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}"
        "{{ '<start_of_turn>model\n' }}{% endif %}")
    wrapped.save_pretrained(out)
    return out


def child(k: int, folder: Path, method: str, candidates: int) -> None:
    """One measurement: prints a JSON line."""
    peak = [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], status_kib("RssAnon"))
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    # The runtime (Python, torch, transformers' Llama, mergekit's planner) is a fixed cost,
    # measured as the baseline; what scales with the models is measured above it.
    import mergekit.architecture
    import mergekit.merge
    import mergekit.plan  # noqa: F401
    import torch  # noqa: F401
    from transformers import LlamaForCausalLM  # noqa: F401

    from pipelines.config import EvolveJob
    from pipelines.merge.evolve import Evaluator, SearchSpace, resolve_sources
    from pipelines.workspace import Workspace

    models = sorted(p for p in folder.glob("m*") if p.is_dir())[:k]
    base = str(models[0]) if method != "linear" else None
    others = [str(m) for m in (models[1:] if base else models)]
    cfg = EvolveJob(job="evolve", name="bench", method=method, base_model=base, models=others,
                    options={"device": "cpu"}, fitness={"judge": 0, "style": 1},
                    questions_limit=2, max_new_tokens=8, batch_size=2)
    space = SearchSpace.build(cfg, *resolve_sources(cfg, None), "bfloat16")
    workspace = Workspace.load(REPO / "configs")
    baseline = status_kib("RssAnon") * 1024
    t0 = time.perf_counter()
    evaluator = Evaluator(cfg, workspace, space)
    loaded = time.perf_counter() - t0
    loaded_anon = status_kib("RssAnon") * 1024
    seconds = []
    for n in range(candidates):
        x = [v.start + 0.1 * ((n + i) % 3 - 1) for i, v in enumerate(space.variables)]
        t = time.perf_counter()
        evaluator.evaluate(space.decode(x), seed=n)
        seconds.append(round(time.perf_counter() - t, 2))
    stop.set()
    sampler.join()
    peak_anon = max(peak[0], status_kib("RssAnon")) * 1024
    model_bytes = (models[0] / "model.safetensors").stat().st_size
    print(json.dumps({"k": k, "method": method, "model_bytes": model_bytes,
                      "peak_anon": peak_anon, "baseline_anon": baseline,
                      "loaded_anon": loaded_anon,
                      "vm_hwm": status_kib("VmHWM") * 1024, "load_s": round(loaded, 2),
                      "candidate_s": seconds}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=None, help="where the models are built")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--method", default="linear",
                        choices=["linear", "task_arithmetic", "ties", "dare_ties"])
    parser.add_argument("--candidates", type=int, default=2)
    parser.add_argument("--ks", default="2,3,4")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    folder = args.dir or Path(tempfile.gettempdir()) / f"kyara-evolve-bench-{args.hidden}x{args.layers}"
    if args.child is not None:
        child(args.child, folder, args.method, args.candidates)
        return

    ks = [int(k) for k in args.ks.split(",")]
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(folder / "tokenizer")
    t = time.perf_counter()
    for seed in range(max(ks)):
        build_model(folder / f"m{seed}", seed, hidden=args.hidden, layers=args.layers,
                    vocab=args.vocab, intermediate=int(args.hidden * 2.75), heads=16,
                    kv_heads=8, tokenizer=tokenizer)
    print(f"models in {folder} ({time.perf_counter() - t:.0f} s)")
    print(f"{'K':>2} {'method':<16}{'model':>10}{'base anon':>11}{'loaded':>9}{'peak anon':>11}"
          f"{'peak/model':>11}{'(peak-base)/model':>19}  candidate s")
    for k in ks:
        out = subprocess.run([sys.executable, __file__, "--child", str(k), "--dir", str(folder),
                              "--method", args.method, "--candidates", str(args.candidates)],
                             capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        mib = 1024**2
        print(f"{k:>2} {r['method']:<16}{r['model_bytes'] / mib:>8.0f}Mi"
              f"{r['baseline_anon'] / mib:>9.0f}Mi{r['loaded_anon'] / mib:>7.0f}Mi"
              f"{r['peak_anon'] / mib:>9.0f}Mi"
              f"{r['peak_anon'] / r['model_bytes']:>11.2f}"
              f"{(r['peak_anon'] - r['baseline_anon']) / r['model_bytes']:>19.2f}"
              f"  {r['candidate_s']}")


if __name__ == "__main__":
    main()
