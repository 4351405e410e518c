"""Run one linear CPU merge in this process and print its peak RSS (VmHWM) in bytes.
Usage: python rss_child.py OUT_DIR SHARD_SIZE MODEL_DIR..."""

from __future__ import annotations

import sys
from pathlib import Path


def peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def main() -> None:
    out, shard, *models = sys.argv[1:]
    from pipelines.config import MergeOptions
    from pipelines.merge.merge import run_merge, validate_merge_config

    config = validate_merge_config({
        "merge_method": "linear",
        "models": [{"model": m, "parameters": {"weight": 1.0}} for m in models],
    })
    run_merge(config, out, MergeOptions(device="cpu", out_shard_size=shard))
    print(peak_rss())


if __name__ == "__main__":
    main()
