"""TRL's SFTTrainer with a cheaper loss, a progress callback that speaks in job events, and
checkpoints that say when they are complete.

Loss: only the positions whose next token is trained need logits. The model's own
`logits_to_keep` (a boolean mask) projects just those rows through the LM head; Gemma's
262k-token vocabulary makes the full logits most of a CPU step otherwise (TRL's fused
head computes the same values, tiled, but its backward costs ~4x ours on CPU). The loss is
the same: token-level cross-entropy over the trained tokens, divided by the trained
tokens of the whole accumulated batch, as TRL divides it. Models without `logits_to_keep`
take TRL's path.

Checkpoints: HF saves `checkpoint-N/` and then calls `on_save`; only then is the marker
file written. A folder without it was cut short (SIGKILL, power) and is never resumed.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import TrainerCallback
from trl import SFTTrainer

from pipelines import events as ev
from pipelines.config import fsdp_sharded
from pipelines.events import Event
from pipelines.files import rename

COMPLETE = "kyara-complete.json"
FINGERPRINT = "kyara-fingerprint.json"


def common_arguments(cfg: Any, out: Path, cuda: bool, has_eval: bool) -> dict[str, Any]:
    """The training arguments the train and prefer jobs set alike, from the fields their
    configs share: batches, schedule, checkpoints every save_steps under out/checkpoints
    (evaluated there too when there are eval rows), precision and device, seeds.
    `batch_size` is the global batch of a step: with `processes` > 1 (training under
    Accelerate, pipelines/jobs/distributed_worker.py) each process takes an equal share, so
    the run sees the same batches whatever the number of processes."""
    per_process = cfg.batch_size // getattr(cfg, "processes", 1)
    return dict(
        output_dir=str(out / "checkpoints"),
        per_device_train_batch_size=per_process,
        per_device_eval_batch_size=per_process,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.keep_checkpoints,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=cfg.save_steps,
        bf16=cuda and torch.cuda.is_bf16_supported(),
        fp16=False,
        gradient_checkpointing=cfg.gradient_checkpointing and cuda,
        use_cpu=not cuda,
        seed=cfg.seed,
        data_seed=cfg.seed,
        max_length=cfg.max_seq_len,
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        save_only_model=False,
        **fsdp_arguments(cfg),
    )


def fsdp_arguments(cfg: Any) -> dict[str, Any]:
    """`distributed: fsdp` with several processes: FSDP2 (`fully_shard`) through Accelerate,
    one unit per decoder layer (the model's `_no_split_modules`), each resharded after its
    forward; the adapter saved from a full state dict gathered to rank 0. CUDA only: on the
    CPU Accelerate would fall back to DDP without a word, so the job refuses it there. DDP,
    the default, needs no arguments: the Trainer wraps the model in DDP whenever it runs in
    several processes."""
    if not fsdp_sharded(cfg):
        return {}
    return {"fsdp": True,
            "fsdp_config": {"version": 2, "reshard_after_forward": True,
                            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                            "state_dict_type": "FULL_STATE_DICT"}}


# --- checkpoints -------------------------------------------------------------------------


def load_base_model(cfg: Any, model_source: Path | str, model_type: str,
                    attn_implementation: str | None, cuda: bool) -> Any:
    """The base model a train or prefer job puts its LoRA on: bf16 on CUDA (4-bit NF4 with
    `cfg.qlora`, prepared for k-bit training), fp32 on the CPU; attention by the one loader's
    rule (pipelines.inference.loading: eager for Gemma unless the variant names one)."""
    from pipelines.inference.loading import default_dtype, load_causal_lm

    quantization = device_map = None
    if cfg.qlora:
        from transformers import BitsAndBytesConfig

        quantization = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
        # this process's GPU: with processes > 1 each rank is launched with its LOCAL_RANK
        device_map = {"": int(os.environ.get("LOCAL_RANK", "0"))}
    torch.manual_seed(cfg.seed)
    model = load_causal_lm(model_source, dtype=default_dtype(cuda), model_type=model_type,
                           attn_implementation=attn_implementation, device_map=device_map,
                           quantization_config=quantization)
    if cfg.qlora:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    return model


def _step_of(path: Path) -> int:
    try:
        return int(path.name.rsplit("-", 1)[1])
    except (IndexError, ValueError):
        return -1


def complete_checkpoints(folder: Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in folder.glob("checkpoint-*") if (p / COMPLETE).is_file() and _step_of(p) >= 0]
    return sorted(found, key=_step_of)


def latest_checkpoint(folder: Path) -> Path | None:
    done = complete_checkpoints(folder)
    return done[-1] if done else None


def remove_incomplete(folder: Path) -> list[Path]:
    """Delete checkpoint folders without the marker (written by a process that died)."""
    folder = Path(folder)
    gone = [p for p in folder.glob("checkpoint-*") if p.is_dir() and not (p / COMPLETE).is_file()]
    for path in gone:
        shutil.rmtree(path, ignore_errors=True)
    return gone


def prepare_checkpoints(folder: Path, fingerprint: dict[str, Any]) -> tuple[Path | None, list[str]]:
    """The checkpoint to resume from (None: start fresh) and notes for the log. Checkpoints
    of another configuration or data are moved out of the way, not resumed."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    stamp = folder / FINGERPRINT
    wanted = json.dumps(fingerprint, sort_keys=True)
    if stamp.is_file() and stamp.read_text(encoding="utf-8") != wanted and any(folder.glob("checkpoint-*")):
        old = folder.with_name(f"{folder.name}.stale-{int(time.time())}")
        rename(folder, old)
        folder.mkdir()
        notes.append(f"the data or settings changed since the last checkpoints; they were moved "
                     f"to {old} and training starts from step 0")
    stamp.write_text(wanted, encoding="utf-8")
    for path in remove_incomplete(folder):
        notes.append(f"removed {path.name}: it was never completed (the process stopped while "
                     "saving it)")
    return latest_checkpoint(folder), notes


# --- the trainer -------------------------------------------------------------------------


def _accepts_logits_to_keep(model: Any) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return "logits_to_keep" in inspect.signature(type(base).forward).parameters
    except (TypeError, ValueError):
        return False


class KyaraSFTTrainer(SFTTrainer):
    """SFTTrainer whose loss projects only the trained positions through the LM head, and
    which counts the tokens it trains on (for tokens/s)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tokens_seen = 0
        self.fast_loss = _accepts_logits_to_keep(self.model)

    def _get_train_sampler(self, train_dataset=None):
        sampler = super()._get_train_sampler(train_dataset)
        if self.args.world_size > 1 and hasattr(sampler, "batch_size"):
            # group_by_length groups by the batch of a step, which is all the processes'
            # shares together: the same groups, so the same batches, as in one process
            sampler.batch_size *= self.args.world_size
        return sampler

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training and "attention_mask" in inputs:
            self.tokens_seen += int(inputs["attention_mask"].sum())
        labels = inputs.get("labels")
        if not self.fast_loss or labels is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # keep[b, p]: the token after position p is trained, so p's logits are needed.
        keep = torch.zeros_like(labels, dtype=torch.bool)
        keep[:, :-1] = labels[:, 1:] != -100
        model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        model_inputs["use_cache"] = False
        outputs = model(**model_inputs, logits_to_keep=keep)
        logits = outputs.logits.reshape(-1, outputs.logits.shape[-1]).float()
        targets = labels[:, 1:][keep[:, :-1]]
        total = F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum")
        count = targets.numel() if num_items_in_batch is None else num_items_in_batch
        loss = total / torch.as_tensor(count, device=total.device).clamp(min=1)
        if (num_items_in_batch is not None and self.args.average_tokens_across_devices
                and self.accelerator.num_processes > 1):
            # num_items_in_batch counts every process's tokens and DDP averages the
            # gradients: scaled back, as the Trainer's own compute_loss does
            loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss


# --- progress ----------------------------------------------------------------------------


def _memory_gb() -> tuple[str, float]:
    if torch.cuda.is_available():
        return "gpu_memory_gb", torch.cuda.max_memory_allocated() / 1024 ** 3
    try:
        import resource

        # ru_maxrss is KiB on Linux: the peak resident size of this process.
        return "peak_rss_gb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2
    except (ImportError, OSError):
        return "peak_rss_gb", 0.0


class EventCallback(TrainerCallback):
    """Turns the trainer's progress into job events (through `emit`), writes the
    completion marker after each checkpoint, and stops training when `cancelled()`."""

    def __init__(self, emit: Callable[[Event], None], cancelled: Callable[[], bool],
                 tokens: Callable[[], int]) -> None:
        self.emit = emit
        self.cancelled = cancelled
        self.tokens = tokens
        self.started: float | None = None
        self.first_step = 0
        self.last_eval: float | None = None
        self.last_eval_step: int | None = None
        self.last_loss: float | None = None
        self.stopped = False  # a cancel stopped the training

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()
        self.first_step = state.global_step  # > 0 when resumed
        self.emit(ev.progress(state.global_step, state.max_steps, "steps", stage="train"))
        return control

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step
        self.emit(ev.progress(step, state.max_steps, "steps", stage="train"))
        elapsed = time.perf_counter() - (self.started or time.perf_counter())
        done = step - self.first_step
        if done > 0 and elapsed > 0:
            self.emit(ev.metric("tokens_per_s", self.tokens() / elapsed, step=step, stage="train"))
            self.emit(ev.metric("eta_s", elapsed / done * (state.max_steps - step), step=step,
                                stage="train"))
            name, value = _memory_gb()
            self.emit(ev.metric(name, value, step=step, stage="train"))
        if self.cancelled():
            control.should_save = True   # the next run resumes from here
            control.should_training_stop = True
            self.stopped = True
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        names = {"loss": "loss", "eval_loss": "eval_loss", "learning_rate": "learning_rate",
                 "grad_norm": "grad_norm", "epoch": "epoch"}
        for key, name in names.items():
            value = (logs or {}).get(key)
            if isinstance(value, (int, float)):
                self.emit(ev.metric(name, float(value), step=state.global_step, stage="train"))
                if key == "loss":
                    self.last_loss = float(value)
                if key == "eval_loss":
                    self.last_eval, self.last_eval_step = float(value), state.global_step
        return control

    def on_epoch_end(self, args, state, control, **kwargs):
        self.emit(ev.log(f"epoch {state.epoch:.2f} done at step {state.global_step}"))
        return control

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if folder.is_dir():
            (folder / COMPLETE).write_text(json.dumps({"step": state.global_step}) + "\n",
                                           encoding="utf-8")
            self.emit(ev.log(f"checkpoint {folder.name} saved"))
        return control
