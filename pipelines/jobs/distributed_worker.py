"""One rank of a train or prefer job trained in several processes (`processes` > 1):
`accelerate launch ... -m pipelines.jobs.distributed_worker <out>/distributed`, started by
`trainer_loop.train_in_processes`.

Every rank rebuilds the job's trainer from `spec.json` (the job's config and the rows the
job tokenised once) with the job's own functions, and trains from the checkpoint the job
chose. The Trainer (through Accelerate) wraps the model in DDP, or FSDP, and gives each rank
its share of every batch. Only rank 0 writes: the events (`events.jsonl`, the job yields
them), the checkpoints' model and optimizer (the Trainer's rule; each rank adds only its
own RNG state), the completion marker (after every rank has saved), the adapter and
`result.json`. A `cancel` file stops every rank at the same step's end: the ranks agree on
it (an all-reduce), so none waits for a step the others do not take.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.jobs.trainer_loop import (
    ADAPTER_FOLDER,
    CANCEL_FILE,
    EVENTS_FILE,
    RESULT_FILE,
    SPEC_FILE,
)


@dataclass
class _Rows:
    """The part of the train job's Tokenised that its make_trainer reads."""

    tokenizer: Any
    train_rows: list[dict[str, Any]]
    eval_rows: list[dict[str, Any]]
    train_idx: str = "train"
    eval_idx: str = "eval"

    def rows(self, which: str) -> list[dict[str, Any]]:
        return self.train_rows if which == "train" else self.eval_rows


def build_trainer(spec: dict[str, Any], out: Path) -> tuple[Any, Any]:
    """The job's config and its trainer, as the job's load stage makes them."""
    from transformers import AutoTokenizer

    from pipelines.config import PreferJob, TrainJob

    cuda = bool(spec["cuda"])
    tokenizer = AutoTokenizer.from_pretrained(spec["model_source"])
    if spec["kind"] == "train":
        from pipelines.jobs.train import make_trainer
        from pipelines.training.trainer import load_base_model

        cfg = TrainJob.model_validate(spec["config"])
        model = load_base_model(cfg, spec["model_source"], spec["model_type"],
                                spec["attn_implementation"], cuda)
        rows = _Rows(tokenizer, spec["train_rows"], spec["eval_rows"])
        return cfg, make_trainer(cfg, rows, model, out, cuda)
    from pipelines.training.preference import load_policy, make_trainer

    cfg = PreferJob.model_validate(spec["config"])
    start = Path(spec["start"]) if spec.get("start") else None
    model = load_policy(cfg, spec["model_source"], spec["model_type"],
                        spec["attn_implementation"], start, cuda)
    return cfg, make_trainer(cfg, model, tokenizer, spec["train_rows"], spec["eval_rows"],
                             out, cuda)


def save_adapter(kind: str, model: Any, folder: Path, state: dict[str, Any] | None) -> None:
    """The trained adapter of `model` (a PEFT model) into `folder`, from `state` (a full
    state dict gathered from FSDP's shards) when given, else from the model's own weights.
    A prefer job saves only the trained adapter, not DPO / KTO's reference copy."""
    if kind == "train":
        model.save_pretrained(str(folder), state_dict=state)
    else:
        from pipelines.training.preference import save_adapter as save_trained

        save_trained(model, folder, state)


def _all_ranks(trainer: Any, value: float, op: str) -> float:
    """`value` reduced over the ranks (max or sum), on the device their backend speaks."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    tensor = torch.tensor([float(value)], device=trainer.args.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return float(tensor.item())


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _leave(trainer: Any) -> int:
    """Every rank leaves the process group, together (Accelerate's end_training destroys
    it), before it exits. See `exit_now` for why that is not the end of it."""
    _barrier()
    trainer.accelerator.end_training()
    return 0


def exit_now(code: int) -> None:
    """End this rank without the interpreter's shutdown: a rank that ran DDP over gloo
    sometimes aborted there ("terminate called without an active exception", SIGABRT: a
    C++ thread still joinable when the DDP module's process group is torn down with the
    interpreter), which fails the whole launch after the work is done. Seen in CI and here
    in about 1 run in 10 of a finished 2-process run, with the group destroyed first too.
    Everything a rank writes is written and flushed by now; the streams are flushed here."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the job's own process
    folder = Path((argv if argv is not None else sys.argv[1:])[0])
    out = folder.parent
    spec = json.loads((folder / SPEC_FILE).read_text(encoding="utf-8"))
    cfg, trainer = build_trainer(spec, out)
    rank0 = trainer.accelerator.is_main_process
    processes = trainer.accelerator.num_processes

    from pipelines import events as ev
    from pipelines.training.trainer import EventCallback

    sink = ev.EventWriter(folder / EVENTS_FILE) if rank0 else None  # the torn-line rule too

    def emit(event: Any) -> None:
        if sink is not None:
            sink.write(event)

    def cancelled() -> bool:  # once per step on every rank (EventCallback.on_step_end)
        return _all_ranks(trainer, float((folder / CANCEL_FILE).exists()), "max") > 0

    class RankCallback(EventCallback):
        def on_save(self, args, state, control, **kwargs):
            _barrier()  # every rank's RNG state is in the folder before it is marked complete
            return super().on_save(args, state, control, **kwargs) if rank0 else control

    # tokens/s: this rank's count times the ranks (their shares are alike), summed at the end
    callback = RankCallback(emit, cancelled, lambda: trainer.tokens_seen * processes)
    trainer.add_callback(callback)
    last: dict[str, float] = {}
    if spec["kind"] == "prefer":
        from pipelines.jobs.prefer import preference_metrics

        trainer.add_callback(preference_metrics(emit, last))

    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=spec["resume"])
    seconds = time.perf_counter() - started
    if callback.stopped:  # after a checkpoint, on a cancel every rank saw at the same step
        return _leave(trainer)  # (the file alone could appear between two ranks' looks)
    state = trainer.state
    result: dict[str, Any] = {
        "steps": state.global_step, "epochs": round(float(state.epoch or 0), 3),
        "train_seconds": round(seconds, 1),
        "train_loss": callback.last_loss, "eval_loss": callback.last_eval,
        **{k: round(v, 4) for k, v in last.items()},
    }
    if spec["kind"] == "train" and spec["eval_rows"] and callback.last_eval_step != state.global_step:
        metrics = trainer.evaluate()  # every rank: the eval set is split among them too
        if "eval_loss" in metrics:
            result["eval_loss"] = round(float(metrics["eval_loss"]), 4)
            emit(ev.metric("eval_loss", metrics["eval_loss"], step=state.global_step,
                           stage="train"))
    result["tokens"] = _all_ranks(trainer, trainer.tokens_seen, "sum")
    # FSDP: every rank takes part in gathering the full state dict (rank 0 receives it);
    # DDP: rank 0's model is whole
    from pipelines.config import fsdp_sharded

    state = trainer.accelerator.get_state_dict(trainer.model) if fsdp_sharded(cfg) else None
    if rank0:
        save_adapter(spec["kind"], trainer.accelerator.unwrap_model(trainer.model),
                     folder / ADAPTER_FOLDER, state)
    _barrier()
    if rank0:
        from pipelines.files import write_atomic

        write_atomic(folder / RESULT_FILE, json.dumps(result))
        assert sink is not None
        sink.close()
    return _leave(trainer)


if __name__ == "__main__":
    exit_now(main())
