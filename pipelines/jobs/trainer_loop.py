"""What the train and prefer jobs share: the memory stage (`check_memory`) and the trainer
run (`run_training`).

`trainer.train()` runs in a worker thread; the job's own thread yields the events the
trainer's callbacks put on a queue, as they come, and checks for a cancel between them. A
cancel asks the trainer (through the job context the callbacks watch) to stop at the end of
the step, after a checkpoint; the trainer's own failure is raised in the job's thread.

With `processes` > 1 (`train_in_processes`) the trainer runs instead in that many processes
under Accelerate (`accelerate launch`, DDP, or FSDP with `distributed: fsdp`), each running
`python -m pipelines.jobs.distributed_worker <out>/distributed`: they rebuild the same trainer
from `spec.json` (the job's config and its already-tokenised rows, written here once, so no
rank tokenises anything), and only rank 0 writes events (`events.jsonl`, read back and
yielded here as the job's own), checkpoints (`checkpoints/`, as one process writes them) and
the adapter (`adapter/`, which the job's save stage then copies as it would save its own
trainer's). A cancel is a `cancel` file the ranks agree on at a step's end (a checkpoint is
saved, as in one process); a job killed outright takes the processes with it (their
launcher gets SIGTERM when the job dies).
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Generator
from dataclasses import replace
from pathlib import Path
from typing import Any

from pipelines import events as ev
from pipelines.config import ConfigError, fsdp_sharded
from pipelines.events import Event
from pipelines.jobs import JobCancelled, JobContext
from pipelines.processes import child_env, python

_DONE = object()


def check_memory(cfg: Any, model_source: Any, model_config: Any, sizes: Callable[[], Any],
                 summary: dict[str, Any], what: str = ""
                 ) -> Generator[Event, None, bool]:
    """The device, QLoRA's requirements, and the memory estimate (the one memory model, on
    what `kyara plan` reads too: headers, config, the data's `sizes()`); refuses a run that
    will not fit when `check_memory`. `what` says which estimate in the log line. Returns
    whether it trains on CUDA."""
    from pipelines.plan.model import model_shape
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
    processes = getattr(cfg, "processes", 1)
    if processes > 1:
        # the estimate is one process's (its share of the batch), against one GPU; on the
        # CPU the processes share the host's memory
        what = ", ".join(filter(None, [what, f"each of {processes} processes, batch "
                                       f"{cfg.batch_size // processes}"]))
        if not cuda:
            device = replace(device, free=device.free / processes,
                             name=f"{device.name} (a {processes}th share)")
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


# --- several processes under Accelerate ---------------------------------------------------

WORKER_FOLDER = "distributed"      # under the run's output folder
SPEC_FILE = "spec.json"            # what every rank rebuilds its trainer from
EVENTS_FILE = "events.jsonl"       # rank 0's events
RESULT_FILE = "result.json"        # rank 0's summary of the run, written last
CANCEL_FILE = "cancel"             # present: stop at the end of the step, after a checkpoint
ADAPTER_FOLDER = "adapter"         # the trained adapter as rank 0 saved it
LOG_FILE = "worker.log"            # the processes' own output
CANCEL_WAIT_S = 600                # as long as the one-process loop waits for its thread


class WorkerFailed(RuntimeError):
    """The training processes ended without finishing (their log's last lines say why)."""


class TrainedElsewhere:
    """What the save stage needs of a trainer when the training processes have saved the
    adapter: `model.save_pretrained(folder)` copies their folder."""

    def __init__(self, adapter: Path) -> None:
        self.model = _SavedAdapter(adapter)


class _SavedAdapter:
    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def save_pretrained(self, folder: str | os.PathLike[str], **_: Any) -> None:
        shutil.copytree(self.folder, folder)


def launch_command(processes: int, folder: Path) -> list[str]:
    """`accelerate launch` of the worker module, `processes` ranks on this machine. Its
    `--multi_gpu` is the torchrun launcher; on a machine without CUDA the Trainer's
    `use_cpu` makes them CPU processes over gloo (Accelerate's `--cpu` would start one)."""
    return python("-m", "accelerate.commands.launch", "--multi_gpu",
                  "--num_processes", str(processes), "--num_machines", "1",
                  "--mixed_precision", "no", "--dynamo_backend", "no",
                  "--main_process_port", str(_free_port()),
                  "-m", "pipelines.jobs.distributed_worker", str(folder))


def train_in_processes(cfg: Any, ctx: JobContext, kind: str, out: Path, resume: Path | None,
                       cuda: bool, spec: dict[str, Any], train_count: int,
                       summary: dict[str, Any]) -> Generator[Event, None, TrainedElsewhere]:
    """The train stage in `cfg.processes` processes: `spec` (the model and the tokenised
    rows the worker rebuilds the trainer from) written beside the run, the processes
    launched, rank 0's events yielded as they come. Updates `summary` as the one-process
    stage does; returns what the save stage saves from. Raises JobCancelled after a cancel
    (the processes stopped after a checkpoint), WorkerFailed when they fail."""
    if fsdp_sharded(cfg) and not cuda:
        raise ConfigError("distributed: fsdp shards the model across GPUs and none is "
                          "visible; use distributed: ddp on the CPU")
    if cuda:
        import torch

        if torch.cuda.device_count() < cfg.processes:
            raise ConfigError(f"processes: {cfg.processes} processes need a GPU each and "
                              f"{torch.cuda.device_count()} are visible")
    per = cfg.batch_size // cfg.processes
    yield ev.stage("train", f"{train_count} examples, up to {cfg.epochs:g} epochs, "
                   f"{cfg.processes} processes ({cfg.distributed})")
    yield ev.log(f"training in {cfg.processes} {'GPU' if cuda else 'CPU'} processes under "
                 f"Accelerate ({cfg.distributed}): {per} of the batch of {cfg.batch_size} "
                 f"each, grad_accum {cfg.grad_accum}")
    folder = out / WORKER_FOLDER
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    from pipelines.files import write_atomic

    write_atomic(folder / SPEC_FILE, json.dumps({
        "kind": kind, "config": cfg.model_dump(mode="json"), "cuda": cuda,
        "resume": str(resume) if resume is not None else None, **spec}))
    (folder / EVENTS_FILE).touch()
    log = open(folder / LOG_FILE, "wb")
    started = time.perf_counter()
    proc = subprocess.Popen(python("-c", _DIE_WITH_PARENT,
                                   *launch_command(cfg.processes, folder)),
                            stdout=log, stderr=subprocess.STDOUT, env=_worker_env(folder),
                            start_new_session=True)  # a cancel reaches them as a file
    log.close()
    tailer = ev.Tailer(folder / EVENTS_FILE)
    try:
        while proc.poll() is None:
            yield from tailer.poll()
            if ctx.cancelled():
                (folder / CANCEL_FILE).touch()
            time.sleep(0.25)
        yield from tailer.poll()
    finally:
        if proc.poll() is None:  # a cancel (JobCancelled) or the generator closed
            _stop(proc, folder)
    if ctx.cancelled() or (folder / CANCEL_FILE).exists():
        raise JobCancelled()
    result_path = folder / RESULT_FILE
    if proc.returncode != 0 or not result_path.is_file():
        raise WorkerFailed(f"the {cfg.processes} training processes failed (exit "
                           f"{proc.returncode}): {_last_line(folder / LOG_FILE)} (the whole "
                           f"log: {folder / LOG_FILE})")
    result = json.loads(result_path.read_text(encoding="utf-8"))
    summary.update({"processes": cfg.processes, **result,
                    "wall_seconds": round(time.perf_counter() - started, 1)})  # loads too
    tokens, seconds = summary.pop("tokens", None), result.get("train_seconds")
    summary["tokens_per_s"] = round(tokens / seconds, 1) if tokens and seconds else None
    return TrainedElsewhere(folder / ADAPTER_FOLDER)


def _stop(proc: subprocess.Popen[bytes], folder: Path) -> None:
    """Ask the ranks to stop after a checkpoint; after CANCEL_WAIT_S, end them."""
    (folder / CANCEL_FILE).touch()
    try:
        proc.wait(timeout=CANCEL_WAIT_S)
        return
    except subprocess.TimeoutExpired:
        pass
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 30)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=wait)
            return
        except (ProcessLookupError, subprocess.TimeoutExpired):
            continue


def _worker_env(folder: Path) -> dict[str, str]:
    """The job's environment, with this checkout importable wherever the job runs from and
    nothing from the directory it runs in (pipelines.processes: the ranks accelerate starts
    inherit PYTHONSAFEPATH), and its temporary files in `folder`: torchrun makes a
    `torchelastic_*` folder under the temporary directory on every launch and never removes
    it."""
    env = child_env()
    tmp = folder / "tmp"
    tmp.mkdir(exist_ok=True)
    env["TMPDIR"] = str(tmp)
    env.setdefault("OMP_NUM_THREADS", "1")  # torchrun's own default for several processes
    return env


# Run first in the launcher's process, then replaced by it (exec keeps the setting): the
# launcher gets SIGTERM when the job's process dies (SIGKILL included) and passes it on to
# its ranks. Linux (prctl PR_SET_PDEATHSIG); elsewhere a killed job leaves them to finish.
_DIE_WITH_PARENT = """
import ctypes, os, signal, sys
try:
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)
except (OSError, AttributeError):
    pass
os.execv(sys.argv[1], sys.argv[1:])
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# a Python exception's last line, as a rank prints it (torch may put "[rank1]: " first)
_EXCEPTION = re.compile(r"^\s*(\[rank\d+\]:\s*)?[\w.]*(Error|Exception)\b")


def _last_line(path: Path) -> str:
    """Why the ranks failed, in one line: the last Python exception a rank printed (not the
    launcher's own ChildFailedError), else how torchrun's root-cause rank died (a signal:
    "traceback : Signal 6 (SIGABRT) received by PID ..."), else the log's last line."""
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").strip().splitlines()
    except OSError:
        return "no log"
    errors = [line for line in lines
              if _EXCEPTION.match(line) and "ChildFailedError" not in line]
    signals = [line.strip().removeprefix("traceback :").strip() for line in lines
               if line.strip().startswith("traceback : Signal")]
    return ev.one_line((errors or signals or lines or ["no output"])[-1], 300)
