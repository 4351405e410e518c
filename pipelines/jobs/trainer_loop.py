"""What the train and prefer jobs share: the memory stage (`check_memory`) and the trainer
run (`run_training`).

`trainer.train()` runs in a worker thread; the job's own thread yields the events the
trainer's callbacks put on a queue, as they come, and checks for a cancel between them. A
cancel asks the trainer (through the job context the callbacks watch) to stop at the end of
the step, after a checkpoint; the trainer's own failure is raised in the job's thread.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

from pipelines import events as ev
from pipelines.config import ConfigError
from pipelines.events import Event
from pipelines.jobs import JobCancelled, JobContext

_DONE = object()


def check_memory(cfg: Any, model_source: Any, model_config: Any, sizes: Callable[[], Any],
                 summary: dict[str, Any], what: str = ""
                 ) -> Generator[Event, None, bool]:
    """The device, QLoRA's requirements, and the memory estimate (the one memory model, on
    what `kyara plan` reads too: headers, config, the data's `sizes()`); refuses a run that
    will not fit when `check_memory`. `what` says which estimate in the log line. Returns
    whether it trains on CUDA."""
    from pipelines.merge.planner import model_shape
    from pipelines.training.memory import GiB, detect_device, refusal, train_estimate

    yield ev.stage("memory", "estimating what the run needs")
    device = detect_device()
    cuda = device.kind == "cuda"
    if cfg.qlora and not cuda:
        raise ConfigError("qlora: 4-bit QLoRA (bitsandbytes) needs a CUDA GPU and none is "
                          "visible; set qlora: false to train LoRA on the CPU")
    if cfg.qlora:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise ConfigError("qlora: 4-bit QLoRA needs the bitsandbytes package: pip install "
                              "'bitsandbytes>=0.46.1'") from None
    shape = model_shape(model_source, config=model_config)
    sizes = sizes()
    est = train_estimate(cfg, shape, sizes, cuda=cuda)
    yield ev.log(f"memory estimate{f' ({what})' if what else ''}: {est.describe()}; "
                 f"{device.name} has {device.free / GiB:.1f} GiB free")
    yield ev.metric("memory_estimate_gb", est.total / GiB, stage="memory")
    summary["memory_estimate"] = est.to_dict()
    why = refusal(cfg, shape, sizes, device, est) if cfg.check_memory else None
    if why:
        raise ConfigError(why)
    return cuda


def run_training(trainer: Any, resume: Path | None, ctx: JobContext, events: queue.Queue[Any],
                 name: str) -> Generator[Event, None, float]:
    """Train (from the checkpoint `resume`, if any), yielding what the callbacks put on
    `events`. Raises the trainer's exception, or JobCancelled after a cancel. Returns the
    seconds it trained."""
    failure: list[BaseException] = []
    started = time.perf_counter()
    thread = threading.Thread(target=_train, args=(trainer, resume, events, failure),
                              name=name, daemon=True)
    thread.start()
    try:
        while True:
            try:
                item = events.get(timeout=0.5)
            except queue.Empty:
                ctx.check_cancelled()
                continue
            if item is _DONE:
                break
            yield item
    finally:
        if thread.is_alive():
            ctx.cancel()  # the trainer saves a checkpoint at the end of this step and stops
            thread.join(timeout=600)
    if failure:
        raise failure[0]
    if ctx.cancelled():
        raise JobCancelled()
    return time.perf_counter() - started


def _train(trainer: Any, resume: Path | None, events: queue.Queue[Any],
           failure: list[BaseException]) -> None:
    try:
        trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
    except BaseException as exc:  # re-raised by the job's own thread
        failure.append(exc)
    finally:
        events.put(_DONE)
