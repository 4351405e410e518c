"""The evolve job on a GPU capped at 24 GiB: three random-weight 7B-shaped models
(Mistral-7B shapes, bf16, built here, no download), two evaluations (merge into the one
resident model + batched generation), peak GPU memory against the planner's prediction.

    python bench/gpu/evolve_24gb.py                 # 3 x 7B on the GPU, capped at 24 GiB
    python bench/gpu/evolve_24gb.py --cap 0         # no cap
    python bench/gpu/evolve_24gb.py --tiny          # the same code path, tiny shapes, CPU
    python bench/gpu/evolve_24gb.py --dir /big/disk # where the ~3 x 14.5 GB are written

The lab's failure was a three-model evolve on a 24 GB RTX 3090 running out of CUDA memory;
this checks the design's claim: peak GPU memory ~ one model + KV cache + one tensor's
merge inputs. Fitness is offline (style checks only, the judge weight is 0), so nothing
needs the network. Measured on an H200 capped at 24 GiB (bench/README.md); the 3090 itself
pending.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from evolve_memory import build_tokenizer  # noqa: E402  (the same tiny tokenizer)

MISTRAL_7B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, vocab_size=32000)
TINY = dict(hidden_size=128, intermediate_size=352, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, vocab_size=1000)
GiB = 1024**3
SHARD = 2 * GiB


def build_model(path: Path, seed: int, shape: dict, tokenizer: Path) -> Path:
    """Random bf16 tensors written shard by shard (host RAM holds one shard, not a model)."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    if (path / "config.json").is_file():
        return path
    config = LlamaConfig(**shape, max_position_embeddings=4096, tie_word_embeddings=False,
                         dtype="bfloat16", architectures=["LlamaForCausalLM"],
                         bos_token_id=2, eos_token_id=1, pad_token_id=0)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlamaForCausalLM(config).state_dict().items()}
    path.mkdir(parents=True, exist_ok=True)
    # Drawn on the GPU where there is one (seconds instead of minutes for 7B), kept on the host.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=device).manual_seed(seed)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    weight_map: dict[str, str] = {}
    names: list[str] = []

    def flush() -> None:
        name = f"model-{len(names) + 1:05d}.safetensors"
        save_file(shards[-1], str(path / name), metadata={"format": "pt"})
        for key in shards[-1]:
            weight_map[key] = name
        names.append(name)
        shards[-1] = {}

    for key, shape_ in shapes.items():
        tensor = (torch.randn(shape_, generator=gen, device=device) * 0.02).to(
            torch.bfloat16).cpu()
        if size + tensor.numel() * 2 > SHARD and shards[-1]:
            flush()
            size = 0
        shards[-1][key] = tensor
        size += tensor.numel() * 2
    flush()
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": weight_map}), encoding="utf-8")
    config.save_pretrained(path)
    for file in tokenizer.iterdir():
        shutil.copy(file, path / file.name)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU: a dry run")
    parser.add_argument("--cap", type=float, default=24.0, help="GiB; 0: no cap")
    parser.add_argument("--method", default="ties",
                        choices=["linear", "task_arithmetic", "ties", "dare_ties"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    args = parser.parse_args()

    import torch

    from pipelines.config import EvolveJob
    from pipelines.jobs import JobContext
    from pipelines.jobs.evolve import run
    from pipelines.workspace import Workspace

    device = "cpu" if args.tiny else "cuda"
    if device == "cuda":
        if not torch.cuda.is_available():
            sys.exit("no CUDA GPU here; use --tiny for a CPU dry run")
        total = torch.cuda.get_device_properties(0).total_memory
        if args.cap > 0:
            torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap * GiB / total))
            print(f"GPU capped at {args.cap:.0f} GiB of {total / GiB:.0f} GiB")
    shape = TINY if args.tiny else MISTRAL_7B
    folder = args.dir or Path(tempfile.gettempdir()) / (
        "kyara-evolve-7b" if not args.tiny else "kyara-evolve-tiny")
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(folder / "tokenizer")
    t = time.perf_counter()
    models = [build_model(folder / f"m{i}", i, shape, tokenizer) for i in range(3)]
    print(f"models in {folder} ({time.perf_counter() - t:.0f} s)")
    if device == "cuda":
        torch.cuda.empty_cache()  # the drawing's cached blocks are not the job's

    cfg = EvolveJob(job="evolve", name="evolve-24gb", method=args.method,
                    base_model=None if args.method == "linear" else str(models[0]),
                    models=[str(m) for m in (models if args.method == "linear" else models[1:])],
                    population=2, generations=1, options={"device": device},
                    fitness={"judge": 0, "style": 1}, questions_limit=args.batch,
                    batch_size=args.batch, max_new_tokens=args.max_new_tokens,
                    output=str(Path(tempfile.mkdtemp(prefix="evolve-24gb-"))))
    run_dir = Path(tempfile.mkdtemp(prefix="evolve-24gb-run-"))
    ctx = JobContext.create(Workspace.load(REPO / "configs"), run_dir)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    predicted = None
    for event in run(cfg, ctx):
        if event.type == "metric" and event.name == "predicted_gpu_bytes":
            predicted = event.value
        if event.type in ("log", "error", "stage") or (
                event.type == "metric" and event.name == "fitness"):
            text = (f"{event.name} {event.value:.4f}" if event.type == "metric"
                    else event.message or event.stage)
            print(f"  [{event.type}] {text}")
        if event.type == "metric" and event.name == "fitness" and device == "cuda":
            # after every evaluation: a run cut short by a time limit still has its figure
            print(f"  peak GPU allocated so far {torch.cuda.max_memory_allocated() / GiB:.2f} "
                  f"GiB, reserved {torch.cuda.max_memory_reserved() / GiB:.2f} GiB")
        if event.type == "done":
            print(f"  [done] {json.dumps(event.summary)}")
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated()
        reserved = torch.cuda.max_memory_reserved()
        print(f"peak GPU allocated {peak / GiB:.2f} GiB, reserved {reserved / GiB:.2f} GiB"
              + (f"; planner predicted {predicted / GiB:.2f} GiB" if predicted else ""))
    else:
        print("dry run on CPU: the code path ran; GPU figures need a GPU")


if __name__ == "__main__":
    main()
