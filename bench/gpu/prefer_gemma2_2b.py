"""The prefer job on a GPU: gemma-2-2b-jpn-it (or a random model of its shape) with LoRA,
DPO / ORPO / KTO on preference pairs made from the Ayane dialogues. Prints seconds per
step, tokens/s and the peak GPU memory of training against the job's own estimate (the
number `kyara plan` prints and the job refuses on), per method.

    python bench/gpu/prefer_gemma2_2b.py                        # google/gemma-2-2b-jpn-it
    python bench/gpu/prefer_gemma2_2b.py --random TOKENIZER_DIR  # same shapes, random weights
    python bench/gpu/prefer_gemma2_2b.py --random tiny           # ... and a small BPE tokenizer
    python bench/gpu/prefer_gemma2_2b.py --methods dpo --steps 20 --batch 2 --max-len 384

Pairs: the persona's reply to each dialogue's first question is chosen, another dialogue's
reply rejected (realistic lengths, no sampling, no judge). The planner's verdict for
configs/jobs/prefer-ayane-gemma2.yaml (batch 2 x 384 tokens, LoRA r 16, bf16) is the
`--batch 2 --max-len 384` line: the estimate is an upper bound, the measured peak must be
below it. Written for the lab's RTX 3090 (24 GB); measured on an H200 capped at 24 GiB
(bench/README.md), the 3090 itself pending.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_gemma2_2b import cap_gpu, job_context, random_model  # noqa: E402


def preference_file(out: Path, rows: int) -> Path:
    dialogues = [json.loads(line) for line in
                 (REPO / "configs" / "personas" / "ayane" / "dialogues.jsonl")
                 .read_text(encoding="utf-8").splitlines() if line.strip()]
    pairs = []
    for i, d in enumerate(dialogues[:rows]):
        other = dialogues[(i + len(dialogues) // 2) % len(dialogues)]
        pairs.append({"id": d.get("id", str(i)), "prompt": d["messages"][:1],
                      "chosen": d["messages"][1:2], "rejected": other["messages"][1:2]})
    out.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs),
                   encoding="utf-8")
    return out


def run_method(model: str, method: str, steps: int, batch: int, max_len: int,
               home: Path) -> dict:
    import torch

    from pipelines.config import parse_job
    from pipelines.jobs import get_job

    data = preference_file(home / f"prefs-{method}.jsonl", rows=max(64, steps * batch))
    cfg = parse_job({"job": "prefer", "name": f"gpu-{method}", "persona": "ayane",
                     "base": "gpu-base", "method": method, "data": str(data),
                     "max_steps": steps, "batch_size": batch, "max_seq_len": max_len,
                     "learning_rate": 5e-5, "save_steps": max(steps, 1), "logging_steps": 5,
                     "eval_questions": 16, "lora": {"r": 16, "alpha": 32, "dropout": 0.05,
                                                    "target_modules": "all-linear"}}, method)
    ctx = job_context(model, home, method)
    torch.cuda.reset_peak_memory_stats()
    events = list(get_job("prefer").run(cfg, ctx))
    summary = events[-1].summary or {}
    peaks = [e.value for e in events if e.type == "metric" and e.name == "gpu_memory_gb"]
    return {"method": method, "tokens_per_s": summary.get("tokens_per_s"),
            "s_per_step": (summary.get("train_seconds") or 0) / max(1, summary.get("steps") or 1),
            "peak_gb": max(peaks) if peaks else torch.cuda.max_memory_allocated() / 1024 ** 3,
            "estimate_gb": (summary.get("memory_estimate") or {}).get("total"),
            "loss": summary.get("train_loss"), "margin": summary.get("reward_margin"),
            "table": (summary.get("mini_eval") or {}).get("table", "")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="google/gemma-2-2b-jpn-it")
    parser.add_argument("--random", metavar="TOKENIZER_DIR", default=None)
    parser.add_argument("--methods", default="dpo,orpo,kto")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--max-len", type=int, default=384)
    parser.add_argument("--cap", type=float, default=24.0, help="GiB; 0: no cap")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        sys.exit("this benchmark needs a CUDA GPU")
    cap_gpu(args.cap)
    home = Path(tempfile.mkdtemp(prefix="kyara-gpu-prefer-"))
    model = args.model
    if args.random:
        model = str(random_model(args.random, home / "gemma2-2b-random"))
    print(f"{torch.cuda.get_device_name()}, model {model}")
    for method in args.methods.split(","):
        r = run_method(model, method, args.steps, args.batch, args.max_len, home)
        ok = r["estimate_gb"] is not None and r["peak_gb"] <= r["estimate_gb"]
        print(f"{method:5} {r['tokens_per_s']} tokens/s, {r['s_per_step']:.2f} s/step, peak "
              f"{r['peak_gb']:.2f} GiB vs estimate {r['estimate_gb']} GiB "
              f"({'within' if ok else 'OVER'}), loss {r['loss']}, reward margin {r['margin']}")
        if r["table"]:
            print(r["table"])


if __name__ == "__main__":
    main()
