"""The CPU quick-start, timed: configs/jobs/quickstart-ayane-270m.yaml run whole through the
real runner (`python -m pipelines run`) in its own process, in a scratch home (so it
dequantises the packaged Gemma 3 270M and trains from scratch, and registers nothing in
yours).

    .venv/bin/python bench/quickstart.py [--home DIR] [--keep]

Prints the seconds of train() (goal: under 15 minutes on 2 cores, the README's promise),
the whole job's wall time, the peak memory against the job's own estimate, and the
mini-evaluation's figures, base -> tuned. tests/training/test_quickstart.py checks what the
run teaches (the figures); this script measures how long it takes, which depends on the
machine and on whatever else runs on it: run it when the machine is otherwise idle.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

JOB = REPO / "configs" / "jobs" / "quickstart-ayane-270m.yaml"
GOAL_S = 15 * 60


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", default=None, help="KYARA_HOME for the run (default: a "
                        "scratch folder, removed afterwards unless --keep)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch home")
    args = parser.parse_args()
    home = Path(args.home) if args.home else Path(tempfile.mkdtemp(prefix="kyara-quickstart-"))
    run_dir = home / "bench-run"
    env = {**os.environ, "KYARA_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    started = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, "-m", "pipelines", "run", str(JOB), "--run-dir",
                               str(run_dir)], cwd=REPO, env=env, check=False,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        wall = time.perf_counter() - started
        from pipelines.events import iter_events

        events = list(iter_events(run_dir / "events.jsonl")) if run_dir.is_dir() else []
        if done.returncode != 0 or not events or events[-1].type != "done":
            last = events[-1].message if events else done.stderr[-2000:]
            sys.exit(f"the quick-start did not finish (exit {done.returncode}): {last}")
        summary = events[-1].summary or {}
        peaks = [e.value for e in events if e.type == "metric"
                 and e.name in ("peak_rss_gb", "gpu_memory_gb")]
        train_s = float(summary.get("train_seconds") or 0)
        print(f"quick-start on {os.cpu_count()} cores: train() {train_s:.0f} s "
              f"({train_s / 60:.1f} min; goal < {GOAL_S // 60} min: "
              f"{'met' if train_s < GOAL_S else 'NOT met'}), whole job {wall:.0f} s")
        estimate = (summary.get("memory_estimate") or {}).get("total")
        if peaks and estimate:
            print(f"peak memory {max(peaks):.2f} GiB vs estimate {estimate:.2f} GiB")
        mini = summary.get("mini_eval") or {}
        before, after = mini.get("before") or {}, mini.get("after") or {}
        for key in ("ends_maru", "ojousama", "median_chars", "stop_eos"):
            if key in after:
                print(f"  {key:<13} {before.get(key)} -> {after.get(key)}")
    finally:
        if not args.home and not args.keep:
            shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
