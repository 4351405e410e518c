"""Judge throughput (judge issue, benchmark): N judgments against the scripted
OpenAI-compatible server (tests/judge/scripted_judge_server.py, run as its own process,
as a real judge server would be) answering after a fixed latency: with concurrency 8 and
with concurrency 1, each on a fresh store; then the same items again with concurrency 8
on the first store, which must make no request at all.

Prints: seconds and judgments/s for each, the speed-up 8 vs 1 (goal >= 6x), the most
requests the server saw in flight, and the number of requests the second run made (goal
0). The whole judge path runs (prompt with the whole profile and anchors, HTTP, parsing,
G-Eval, batched store writes); only the model is scripted.

Run: .venv/bin/python bench/judge_throughput.py [--n 200] [--latency 0.05]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

from pipelines.judge import Interaction, Judge  # noqa: E402
from pipelines.workspace import Workspace  # noqa: E402
from store import Store  # noqa: E402

SERVER = ROOT / "tests" / "judge" / "scripted_judge_server.py"
CRITERIA = ["personality", "style"]
KEY_ENV = "KYARA_BENCH_JUDGE_KEY"


class Server:
    """The scripted server in a child process; its counters over HTTP."""

    def __init__(self, latency: float) -> None:
        self.process = subprocess.Popen([sys.executable, str(SERVER), "--delay", str(latency)],
                                        stdout=subprocess.PIPE, text=True)
        self.base_url = self.process.stdout.readline().strip()
        self.root = self.base_url.removesuffix("/v1")

    def stats(self) -> dict:
        with urllib.request.urlopen(f"{self.root}/stats") as response:
            return json.loads(response.read())

    def reset(self) -> None:
        urllib.request.urlopen(urllib.request.Request(f"{self.root}/stats", method="DELETE"))

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


def configs_for(base_url: str, where: Path, concurrency: int) -> Workspace:
    root = where / f"configs-{concurrency}"
    shutil.copytree(ROOT / "configs", root, dirs_exist_ok=True)
    judge = {"name": "bench", "provider": "openai_compatible", "model": "scripted-judge",
             "base_url": base_url, "api_key_env": KEY_ENV, "criteria": CRITERIA,
             "few_shot": 3, "concurrency": concurrency, "timeout_s": 30, "max_retries": 2}
    (root / "judges" / "bench.yaml").write_text(yaml.safe_dump(judge), encoding="utf-8")
    return Workspace.load(root)


async def run(ws: Workspace, store: Store, items: list[Interaction]) -> tuple[float, int, int]:
    judge = Judge.open(ws, "bench", "ayane", store=store)
    started = time.perf_counter()
    try:
        results = await judge.score_items(items, CRITERIA)
    finally:
        await judge.aclose()  # the last verdicts are in the store before the clock stops
    seconds = time.perf_counter() - started
    ok = sum(v.status == "ok" for v in results.values())
    return seconds, judge.requests, ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="judgments per run")
    parser.add_argument("--latency", type=float, default=0.05, help="server seconds per answer")
    args = parser.parse_args()
    os.environ[KEY_ENV] = "sk-bench"
    count = math.ceil(args.n / len(CRITERIA))
    items = [Interaction.from_pair(f"質問{i}は何ですか？", f"返答{i}ですわ。", id=f"bench{i}")
             for i in range(count)]
    n = count * len(CRITERIA)
    server = Server(args.latency)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            where = Path(tmp)
            os.environ["KYARA_HOME"] = str(where / "home")
            ws8, ws1 = configs_for(server.base_url, where, 8), configs_for(server.base_url, where, 1)
            store8, store1 = Store.open(where / "store8"), Store.open(where / "store1")
            # Warm-up on a store of its own: first-use costs are not throughput.
            asyncio.run(run(ws8, Store.open(where / "warm"), items[:8]))
            server.reset()
            t8, requests8, ok8 = asyncio.run(run(ws8, store8, items))
            inflight8 = server.stats()["max_in_flight"]
            server.reset()
            t1, requests1, ok1 = asyncio.run(run(ws1, store1, items))
            inflight1 = server.stats()["max_in_flight"]
            server.reset()
            t_again, _, ok_again = asyncio.run(run(ws8, store8, items))
            requests_again = server.stats()["count"]
    finally:
        server.stop()
    print(f"judge throughput: {n} judgments, server latency {args.latency * 1000:.0f} ms")
    print(f"  concurrency 8: {t8:6.2f} s  {n / t8:6.1f} judgments/s  ({ok8} ok, {requests8} "
          f"requests, at most {inflight8} in flight)")
    print(f"  concurrency 1: {t1:6.2f} s  {n / t1:6.1f} judgments/s  ({ok1} ok, {requests1} "
          f"requests, at most {inflight1} in flight)")
    print(f"  speed-up 8 vs 1: {t1 / t8:.1f}x (goal >= 6x)")
    print(f"  second run over the same items: {requests_again} requests reached the server "
          f"(goal 0); {ok_again} verdicts from the cache in {t_again:.2f} s")


if __name__ == "__main__":
    main()
