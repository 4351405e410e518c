"""Evolve on Ray on this machine: wall time per generation of candidates with 2 actors
against 1, and each actor's memory (the RSS of its process); the plain path (no Ray, one
process; torch on all cores, and on one thread: "plain 1t") as a reference. Ratios are
against the 1-actor run of the same invocation.

    .venv/bin/python bench/evolve_ray.py [--hidden 512] [--layers 6] [--population 4]
                                         [--generations 3] [--rounds 1] [--cpus 2]
    python bench/evolve_ray.py --device cuda --modes "ray 1,ray 2" --hidden 2048 --layers 16
                                         # one actor per GPU (bench/gpu/multi_gpu.sh)

With `--device cuda` each actor takes one GPU (Ray sets its CUDA_VISIBLE_DEVICES), the
models are merged and run in bfloat16, and each process's GPU memory is read from
nvidia-smi.

A local Ray is started with `--cpus` CPUs (one per actor on the CPU: Ray then runs each
actor's torch on one thread). Three random Llama-shaped models (bf16 on disk, merged and run
in float32; built once under the temp folder, as bench/evolve_memory.py builds them), a
linear merge, the persona's held-out questions, the judge off (fitness = style checks), so
each evaluation is merge + generation, all compute. The same candidates go to every mode;
the first generation of each mode is its warm-up (first calls), shown but not averaged.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.evolve_memory import build_model, build_tokenizer  # noqa: E402


def proc_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def gpu_mib() -> dict[int, int]:
    """GPU memory (MiB) per process id, from nvidia-smi; empty where it is not at hand."""
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory",
                              "--format=csv,noheader,nounits"], capture_output=True, check=False,
                             text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    found: dict[int, int] = {}
    for line in out.splitlines():
        pid, _, mib = line.partition(",")
        if pid.strip().isdigit() and mib.strip().isdigit():
            found[int(pid)] = found.get(int(pid), 0) + int(mib)
    return found


def _burn(n: int) -> float:
    t = time.perf_counter()
    x = 0
    for i in range(n):
        x += i * i
    return time.perf_counter() - t


def parallel_capacity(n: int = 20_000_000) -> float:
    """What two processes get done here now against one (pure Python, no threads): the
    ceiling for 2 actors on a shared machine whatever Ray does."""
    import multiprocessing

    one = _burn(n)
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        t = time.perf_counter()
        pool.map(_burn, [n, n])
        two = time.perf_counter() - t
    return 2 * one / two


def candidates(space, population: int, generations: int, sigma: float = 0.2) -> list:
    """The same batches for every mode: [(index, merge config, seed)] per generation."""
    import numpy as np

    rng = np.random.default_rng(0)
    batches = []
    for g in range(generations):
        batch = []
        for i in range(population):
            x = np.asarray(space.x0) + sigma * rng.standard_normal(len(space.x0))
            index = g * population + i
            batch.append((index, space.decode(x.tolist()), index))
        batches.append(batch)
    return batches


def run_mode(mode: str, cfg, space, batches, configs: Path) -> dict:
    import torch

    from pipelines.merge.evolve import Evaluator, sequential
    from pipelines.merge.evolve_ray import RayPool
    from pipelines.workspace import Workspace

    t = time.perf_counter()
    pool = evaluator = None
    threads = torch.get_num_threads()
    if mode.startswith("plain"):
        if mode == "plain 1t":
            torch.set_num_threads(1)
        evaluator = Evaluator(cfg, Workspace.load(configs), space)
        evaluate, pids = sequential(evaluator), [os.getpid()]
    else:
        workers = int(mode.split()[1])
        pool = RayPool(cfg.model_copy(update={"ray": True, "workers": workers}), str(configs),
                       space)
        evaluate, pids = pool.evaluate, [info["pid"] for info in pool.info]
    load = time.perf_counter() - t
    seconds, fitness = [], {}
    try:
        for batch in batches:
            t = time.perf_counter()
            for index, record in evaluate(batch):
                fitness[index] = record["fitness"]
            seconds.append(time.perf_counter() - t)
        gpu = gpu_mib() if cfg.options.device == "cuda" else {}
        memory = [{"rss": proc_kib(p, "VmRSS"), "anon": proc_kib(p, "RssAnon"),
                   "hwm": proc_kib(p, "VmHWM"), "gpu": gpu.get(p)} for p in pids]
    finally:
        if evaluator is not None:
            evaluator.close()
        if pool is not None:
            pool.close()
        torch.set_num_threads(threads)
    return {"mode": mode, "load": load, "seconds": seconds, "memory": memory,
            "fitness": fitness}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=None, help="where the models are built")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--population", type=int, default=4)
    parser.add_argument("--generations", type=int, default=3)
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=24, help="max new tokens per reply")
    parser.add_argument("--rounds", type=int, default=1, help="each mode this many times")
    parser.add_argument("--modes", default="ray 1,ray 2,plain,plain 1t")
    parser.add_argument("--cpus", type=int, default=2, help="the local Ray's CPUs")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="cuda: one GPU per actor, bfloat16")
    args = parser.parse_args()
    folder = args.dir or Path(tempfile.gettempdir()) / (
        f"kyara-evolve-ray-bench-{args.hidden}x{args.layers}x{args.vocab}")
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(folder / "tokenizer")
    models = [build_model(folder / f"m{seed}", seed, hidden=args.hidden, layers=args.layers,
                          vocab=args.vocab, intermediate=int(args.hidden * 2.75),
                          heads=max(1, args.hidden // 64), kv_heads=max(1, args.hidden // 128),
                          tokenizer=tokenizer) for seed in range(3)]

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local bench cluster: no token
    import ray
    import torch

    from pipelines.config import EvolveJob
    from pipelines.merge.evolve import SearchSpace, resolve_sources

    dtype = "bfloat16" if args.device == "cuda" else "float32"

    cfg = EvolveJob(job="evolve", name="bench", method="linear", models=[str(m) for m in models],
                    options={"device": args.device, "dtype": dtype},
                    fitness={"judge": 0, "style": 1}, questions_limit=args.questions,
                    max_new_tokens=args.tokens, batch_size=args.questions,
                    population=args.population, generations=args.generations)
    space = SearchSpace.build(cfg, *resolve_sources(cfg, None), dtype)
    batches = candidates(space, args.population, args.generations)
    model_mib = (models[0] / "model.safetensors").stat().st_size / 2**20  # bf16 on disk
    model_mib *= 1 if args.device == "cuda" else 2                            # fp32 on the CPU
    temp = tempfile.mkdtemp(prefix="kyara-ray-")
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, _temp_dir=temp)
    load_before = os.getloadavg()
    capacity = [parallel_capacity()]
    try:
        modes = args.modes.split(",")
        order = [m for r in range(args.rounds) for m in (modes if r % 2 == 0 else modes[::-1])]
        results = [run_mode(mode, cfg, space, batches, REPO / "configs") for mode in order]
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
    load_after = os.getloadavg()
    capacity.append(parallel_capacity())

    print(f"models {args.hidden} x {args.layers} layers, vocab {args.vocab}: resident "
          f"{model_mib:.0f} MiB {dtype}; {args.population} candidates x {args.generations} "
          f"generations, {args.questions} questions x {args.tokens} tokens; Ray {args.cpus} "
          f"CPUs; torch threads in this process {torch.get_num_threads()}; load average "
          f"{load_before[0]:.2f} before, {load_after[0]:.2f} after")
    print(f"2 processes of pure Python here do {capacity[0]:.2f}x the work of one before, "
          f"{capacity[1]:.2f}x after (the ceiling for 2 actors on this machine now)")
    reference = results[0]["fitness"]
    same = all(r["fitness"] == reference for r in results)
    print(f"every mode gave the same fitness for every candidate: {same}")

    def per_generation(r: dict) -> float:
        warm = r["seconds"][1:] or r["seconds"]
        return statistics.fmean(warm)

    baseline = statistics.fmean(per_generation(r) for r in results if r["mode"] == "ray 1")
    print(f"{'mode':<9}{'start s':>8}{'s / generation (first = warm-up)':>36}{'mean':>7}"
          f"{'vs 1 actor':>11}  RSS per process MiB (anon, peak)")
    for r in results:
        gens = " ".join(f"{s:.2f}" for s in r["seconds"])
        mem = "; ".join(f"{m['rss'] / 1024:.0f} ({m['anon'] / 1024:.0f}, {m['hwm'] / 1024:.0f})"
                        + (f" GPU {m['gpu']}" if m.get("gpu") is not None else "")
                        for m in r["memory"])
        mean = per_generation(r)
        print(f"{r['mode']:<9}{r['load']:>8.1f}{gens:>36}{mean:>7.2f}{baseline / mean:>10.2f}x"
              f"  {mem}")
    for mode in modes:
        mean = statistics.fmean(per_generation(r) for r in results if r["mode"] == mode)
        print(f"{mode}: {mean:.2f} s per generation, throughput {baseline / mean:.2f}x "
              "one actor's")


if __name__ == "__main__":
    main()
