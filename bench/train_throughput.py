"""Training throughput of the train job vs a plain TRL SFTTrainer script, same model, data
and settings; and the job's peak memory vs its own estimate.

    .venv/bin/python bench/train_throughput.py [--model DIR] [--steps 8] [--batch 8]

- model: an HF folder; default the quick-start base, <KYARA_HOME>/models/gemma-3-270m-hf
  (run configs/jobs/quickstart-ayane-270m.yaml once, or pass --model).
- data: the Ayane dialogues with the persona's system prompt, as the job trains on them.
- the job runs through the real runner (`python -m pipelines run`) in its own process; the
  plain script is TRL's conversational prompt-completion format, SFTTrainer + PEFT LoRA,
  with the same LoRA, batch, learning rate, max length, sampler and fp32 / no gradient
  checkpointing on CPU. Both report tokens (attention-mask ones) per second of train().
- goal: job / plain >= 0.95. Peak RSS (CPU) or max allocated (CUDA) vs the estimate.

Each side runs in a fresh process, one after the other: on a shared CPU, run it when the
machine is otherwise idle (the figures move with whatever else runs).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def plain(model_dir: str, steps: int, batch: int, max_len: int) -> None:
    """The plain SFTTrainer script (run in its own process): prints one JSON line."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # the job sets the same
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from pipelines.prompting import GEMMA_TEMPLATE, fold_system
    from pipelines.workspace import Workspace

    ws = Workspace.load(REPO / "configs")
    data = ws.persona_data("ayane")
    system = data.persona.prompts.system
    rows = []
    for d in data.dialogues:
        messages = fold_system([{"role": "system", "content": system}]
                               + [m.model_dump() for m in d.messages])
        rows.append({"prompt": messages[:-1], "completion": messages[-1:]})
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.chat_template = tokenizer.chat_template or GEMMA_TEMPLATE
    cuda = torch.cuda.is_available()
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.bfloat16 if cuda else torch.float32, attn_implementation="eager")
    counted = {"tokens": 0}
    args = SFTConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=batch,
                     max_steps=steps, learning_rate=5e-4, logging_steps=4, save_strategy="no",
                     report_to="none", bf16=cuda, gradient_checkpointing=False, use_cpu=not cuda,
                     max_length=max_len, train_sampling_strategy="group_by_length", seed=0,
                     data_seed=0, disable_tqdm=True)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tokenizer,
                         peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                target_modules="all-linear",
                                                task_type="CAUSAL_LM"))
    collate = trainer.data_collator

    def counting(features):
        batch_out = collate(features)
        counted["tokens"] += int(batch_out["attention_mask"].sum())
        return batch_out

    trainer.data_collator = counting
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    peak = (torch.cuda.max_memory_allocated() if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 1024 ** 3
    print(json.dumps({"tokens_per_s": counted["tokens"] / seconds, "seconds": seconds,
                      "peak_gb": peak}))


def job(model_dir: str, steps: int, batch: int, max_len: int, home: Path) -> dict:
    configs = Path(tempfile.mkdtemp()) / "configs"
    import shutil

    shutil.copytree(REPO / "configs", configs)
    (configs / "models" / "bench-base.yaml").write_text(
        f"name: bench-base\nbackend: hf\nmodel: {model_dir}\nattn_implementation: eager\n",
        encoding="utf-8")
    cfg = configs / "jobs" / "bench-train.yaml"
    cfg.write_text(
        "job: train\nname: bench-train\npersona: ayane\nbase: bench-base\n"
        f"max_steps: {steps}\nbatch_size: {batch}\nmax_seq_len: {max_len}\n"
        "learning_rate: 0.0005\neval_fraction: 0.0\neval_questions: 0\nsave_steps: 100000\n"
        "logging_steps: 4\nlora: {r: 16, alpha: 32, dropout: 0.0, target_modules: all-linear}\n",
        encoding="utf-8")
    run_dir = home / "bench-run"
    env = {**os.environ, "KYARA_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-m", "pipelines", "run", str(cfg), "--run-dir",
                    str(run_dir), "--configs", str(configs)], cwd=REPO, env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    from pipelines.events import iter_events

    events = list(iter_events(run_dir / "events.jsonl"))
    summary = events[-1].summary or {}
    peaks = [e.value for e in events if e.type == "metric"
             and e.name in ("peak_rss_gb", "gpu_memory_gb")]
    return {"tokens_per_s": summary.get("tokens_per_s"), "seconds": summary.get("train_seconds"),
            "peak_gb": max(peaks) if peaks else None,
            "estimate_gb": (summary.get("memory_estimate") or {}).get("total")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-len", type=int, default=192)
    parser.add_argument("--plain", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    home = Path(os.environ.get("KYARA_HOME", "~/.local/share/kyara")).expanduser()
    model = args.model or str(home / "models" / "gemma-3-270m-hf")
    if args.plain:
        plain(model, args.steps, args.batch, args.max_len)
        return
    if not Path(model).is_dir():
        sys.exit(f"no model folder at {model}: run the quick-start job once or pass --model")
    scratch = Path(tempfile.mkdtemp(prefix="kyara-bench-"))
    ours = job(model, args.steps, args.batch, args.max_len, scratch)
    out = subprocess.run([sys.executable, __file__, "--plain", "--model", model, "--steps",
                          str(args.steps), "--batch", str(args.batch), "--max-len",
                          str(args.max_len)], cwd=REPO, check=True, capture_output=True,
                         text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    theirs = json.loads(out.stdout.strip().splitlines()[-1])
    ratio = ours["tokens_per_s"] / theirs["tokens_per_s"]
    print(f"model {model}, {args.steps} steps x batch {args.batch}, max_len {args.max_len}")
    print(f"job:   {ours['tokens_per_s']:8.1f} tokens/s  ({ours['seconds']} s of train())")
    print(f"plain: {theirs['tokens_per_s']:8.1f} tokens/s  ({theirs['seconds']:.1f} s)")
    print(f"ratio job/plain: {ratio:.2f}  (goal >= 0.95)")
    if ours["peak_gb"] and ours["estimate_gb"]:
        print(f"peak memory: job {ours['peak_gb']:.2f} GiB vs estimate {ours['estimate_gb']:.2f} "
              f"GiB (x{ours['estimate_gb'] / ours['peak_gb']:.2f}); plain {theirs['peak_gb']:.2f} GiB")


if __name__ == "__main__":
    main()
