"""A trainer run from a job: the train and prefer jobs share it.

`trainer.train()` runs in a worker thread; the job's own thread yields the events the
trainer's callbacks put on a queue, as they come, and checks for a cancel between them. A
cancel asks the trainer (through the job context the callbacks watch) to stop at the end of
the step, after a checkpoint; the trainer's own failure is raised in the job's thread.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Generator
from pathlib import Path
from typing import Any

from pipelines.events import Event
from pipelines.jobs import JobCancelled, JobContext

_DONE = object()


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
