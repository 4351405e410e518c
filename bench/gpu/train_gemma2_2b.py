"""The train job on a GPU: gemma-2-2b-jpn-it (or a random model of its shape) with LoRA and
QLoRA, on the Ayane dialogues. Prints tokens/s, seconds per step and peak GPU memory
against the job's own estimate, for each mode.

    python bench/gpu/train_gemma2_2b.py                       # google/gemma-2-2b-jpn-it
    python bench/gpu/train_gemma2_2b.py --random TOKENIZER_DIR  # same shapes, random weights
    python bench/gpu/train_gemma2_2b.py --random tiny           # ... and a small BPE tokenizer
    python bench/gpu/train_gemma2_2b.py --modes lora --steps 20 --batch 8 --max-len 512
    python bench/gpu/train_gemma2_2b.py --random tiny --modes lora,lora-ddp,lora-fsdp \
        --processes 2                  # several GPUs: the same global batch in 2 processes

Written for the lab's RTX 3090 (24 GB); figures pending. `--random` needs no download:
throughput and memory depend on the shapes, not the weights (give it any Gemma tokenizer
folder, e.g. <KYARA_HOME>/models/gemma-3-270m-hf). QLoRA needs bitsandbytes.

The job runs in this process with a store stand-in (no LanceDB needed), through the same
`run(cfg, ctx)` the runner calls. A mode `<lora|qlora>-<ddp|fsdp>` trains in `--processes`
processes, one GPU each (`accelerate launch`, as the job does with `processes:`), at the
same global batch: its tokens/s is printed against the one-process mode of the same run
when that mode ran first, its peak is rank 0's GPU, its estimate one GPU's. The 24 GiB cap
holds this process only: the ranks are their own processes, so their peak is printed, not
capped.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

# google/gemma-2-2b-jpn-it's shapes (config.json of the model card).
GEMMA2_2B = dict(hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                 num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                 max_position_embeddings=8192, sliding_window=4096,
                 attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                 query_pre_attn_scalar=256, tie_word_embeddings=True)


GiB = 1024**3


def cap_gpu(cap_gib: float) -> None:
    """Cap this process's CUDA memory at `cap_gib` (the lab's RTX 3090 has 24 GiB): a run
    that needs more fails here as it would there. 0: no cap."""
    import torch

    total = torch.cuda.get_device_properties(0).total_memory
    if cap_gib > 0:
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib * GiB / total))
        print(f"GPU capped at {cap_gib:.0f} GiB of {total / GiB:.0f} GiB")


class NullStore:
    """Takes the variant registration and forgets it."""

    def upsert(self, table, rows):
        self.last = (table, list(rows))

    def get(self, table, id):
        return None


def tiny_tokenizer(out: Path) -> Path:
    """A byte-level BPE with Gemma's special tokens, trained on the persona's text (the
    tests' tokenizer): for `--random tiny` where no Gemma tokenizer folder is at hand."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from tests.inference.conftest import GEMMA2_TEMPLATE, SPECIAL_TOKENS, corpus

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus(), trainer=trainers.BpeTrainer(
        vocab_size=4000, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        unk_token="<unk>", extra_special_tokens=["<start_of_turn>", "<end_of_turn>"])
    wrapped.chat_template = GEMMA2_TEMPLATE
    wrapped.save_pretrained(out)
    return out


def random_model(tokenizer_dir: str, out: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, Gemma2Config, Gemma2ForCausalLM

    if tokenizer_dir == "tiny":
        tokenizer_dir = str(tiny_tokenizer(out.with_name("tokenizer")))
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    # Gemma 2's 256k vocabulary whatever the tokenizer: the embedding and LM head are what
    # make its memory and much of its time.
    config = Gemma2Config(vocab_size=max(len(tok), 256000), bos_token_id=tok.bos_token_id,
                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                          **GEMMA2_2B)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Gemma2ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def job_context(model: str, home: Path, name: str):
    """A copy of configs/ with the variant gpu-base (the model folder, eager attention), a
    workspace whose home is `home`, and a job context that registers nothing."""
    from pipelines.jobs import JobContext
    from pipelines.workspace import Workspace

    configs = home / f"configs-{name}"
    shutil.copytree(REPO / "configs", configs)
    (configs / "models" / "gpu-base.yaml").write_text(
        f"name: gpu-base\nbackend: hf\nmodel: {model}\nattn_implementation: eager\n",
        encoding="utf-8")
    ws = Workspace.load(configs)
    ws.settings = ws.settings.model_copy(update={"home": str(home)})
    return JobContext.create(ws, home / f"run-{name}", store=NullStore())


def run_mode(model: str, mode: str, steps: int, batch: int, max_len: int, home: Path,
             processes: int = 1) -> dict:
    import torch

    from pipelines.config import parse_job
    from pipelines.jobs import get_job

    kind, _, distributed = mode.partition("-")
    several = {"processes": processes, "distributed": distributed} if distributed else {}
    cfg = parse_job({"job": "train", "name": f"gpu-{mode}", "persona": "ayane",
                     "base": "gpu-base", "qlora": kind == "qlora", "max_steps": steps, **several,
                     "batch_size": batch, "max_seq_len": max_len, "learning_rate": 2e-4,
                     "eval_fraction": 0.05, "save_steps": max(steps, 1), "logging_steps": 5,
                     "eval_questions": 16, "lora": {"r": 16, "alpha": 32, "dropout": 0.05,
                                                    "target_modules": "all-linear"}}, mode)
    ctx = job_context(model, home, mode)
    torch.cuda.reset_peak_memory_stats()
    events = list(get_job("train").run(cfg, ctx))
    summary = events[-1].summary or {}
    # The training peak (the callback's max_memory_allocated), not the evaluation's after it.
    peaks = [e.value for e in events if e.type == "metric" and e.name == "gpu_memory_gb"]
    return {"mode": mode, "tokens_per_s": summary.get("tokens_per_s"),
            "s_per_step": (summary.get("train_seconds") or 0) / max(1, summary.get("steps") or 1),
            "peak_gb": max(peaks) if peaks else torch.cuda.max_memory_allocated() / 1024 ** 3,
            "estimate_gb": (summary.get("memory_estimate") or {}).get("total"),
            "eval_loss": summary.get("eval_loss"),
            "table": (summary.get("mini_eval") or {}).get("table", "")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="google/gemma-2-2b-jpn-it")
    parser.add_argument("--random", metavar="TOKENIZER_DIR", default=None)
    parser.add_argument("--modes", default="lora,qlora")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-len", type=int, default=512)
    parser.add_argument("--cap", type=float, default=24.0, help="GiB; 0: no cap")
    parser.add_argument("--processes", type=int, default=2,
                        help="processes (GPUs) of the -ddp / -fsdp modes")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        sys.exit("this benchmark needs a CUDA GPU")
    several = [m for m in args.modes.split(",") if "-" in m]
    if several and torch.cuda.device_count() < args.processes:
        sys.exit(f"modes {', '.join(several)} need {args.processes} GPUs; "
                 f"{torch.cuda.device_count()} visible")
    cap_gpu(args.cap)
    home = Path(tempfile.mkdtemp(prefix="kyara-gpu-"))
    model = args.model
    if args.random:
        model = str(random_model(args.random, home / "gemma2-2b-random"))
    print(f"{torch.cuda.get_device_name()}, model {model}")
    single: dict[str, float] = {}
    for mode in args.modes.split(","):
        r = run_mode(model, mode, args.steps, args.batch, args.max_len, home, args.processes)
        kind = mode.partition("-")[0]
        if mode == kind and r["tokens_per_s"]:
            single[kind] = r["tokens_per_s"]
        ratio = (f" ({r['tokens_per_s'] / single[kind]:.2f}x {kind} in one process)"
                 if mode != kind and kind in single and r["tokens_per_s"] else "")
        print(f"{mode:10} {r['tokens_per_s']} tokens/s{ratio}, {r['s_per_step']:.2f} s/step, "
              f"peak {r['peak_gb']:.2f} GiB vs estimate {r['estimate_gb']} GiB, eval_loss "
              f"{r['eval_loss']}")
        if r["table"]:
            print(r["table"])


if __name__ == "__main__":
    main()
