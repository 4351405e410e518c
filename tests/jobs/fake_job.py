"""Stand-in jobs for the runner and console tests (`job: train` under KYARA_JOB_MODULES).

The mode is the first word of the config's name: fast (3 quick steps), slow (max_steps
steps of 0.2 s), boom (raises), selfterm (sends itself SIGTERM mid-step), interrupt
(raises KeyboardInterrupt). No model, no store: each runs in well under a second.
"""

from __future__ import annotations

import os
import signal
import time

from pipelines import events as ev

STEP_S = 0.2


def run(cfg, ctx):
    mode = cfg.name.split("-")[0]
    yield ev.start("train", cfg.name, "a stand-in job")
    if mode == "boom":
        yield ev.stage("work")
        raise RuntimeError("boom: the stand-in job failed\nwith a second line")
    if mode in ("selfterm", "interrupt"):
        try:
            yield ev.progress(1, 2)
            if mode == "interrupt":
                raise KeyboardInterrupt
            os.kill(os.getpid(), signal.SIGTERM)  # as cancel() would, from outside
            time.sleep(10)  # interrupted: the runner raises JobCancelled in here
            (ctx.run_dir / "slept-through").touch()  # never reached when the cancel works
            yield ev.progress(2, 2)
        finally:
            (ctx.run_dir / "cleaned-up").touch()  # a job's cleanup still runs
    steps = cfg.max_steps if cfg.max_steps > 0 else 3
    yield ev.stage("steps")
    yield ev.log("[bold red]not markup[/] 絢音 \x1b[31m")  # untrusted text, shown as is
    for step in range(1, steps + 1):
        if mode == "slow":
            time.sleep(STEP_S)
        yield ev.progress(step, steps, "steps")
        yield ev.metric("loss", 1.0 / step, step=step)
    yield ev.done({"steps": steps, "run_dir": str(ctx.run_dir)})
