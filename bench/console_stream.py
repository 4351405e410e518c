"""Streaming through the console, headless (console issue, benchmark).

A scripted backend yields 2,000 tokens at a fixed rate (default 500 tok/s, faster than the
RTX 3090 runs gemma-2-2b), timestamping each. The app batches them onto the screen.
Printed, all measured in this run:
- tokens/s on screen vs the backend's (goal >= 0.95x);
- lag from a token leaving the backend to the widget holding it, p50/p95 (goal p95 <= 100 ms);
- key presses during streaming (the details panel toggled), time to the action, p95
  (goal <= 50 ms).

Run: .venv/bin/python bench/console_stream.py [--tokens 2000] [--rate 500]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from console.app import KyaraApp
from pipelines.chat import ChatSession
from pipelines.inference.base import Delta
from pipelines.prompting import render_prompt
from pipelines.workspace import Workspace
from store import Store


class TimedBackend:
    name = "timed"

    def __init__(self, tokens: int, rate: float) -> None:
        self.tokens, self.period = tokens, 1.0 / rate
        self.sent: list[float] = []

    def render(self, messages):
        return render_prompt("gemma", messages, bos_token="<bos>")

    def stream(self, messages, options):
        start = time.perf_counter()
        for i in range(self.tokens):
            target = start + i * self.period
            while time.perf_counter() < target:
                time.sleep(min(0.0005, max(0.0, target - time.perf_counter())))
            self.sent.append(time.perf_counter())
            yield Delta(text="あ")
        yield Delta(done=True, stop_reason="length", completion_tokens=self.tokens)

    def close(self):
        pass


class MeasuredApp(KyaraApp):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.shown: list[tuple[float, int]] = []  # (time, characters on screen)
        self.key_handled: list[float] = []

    def on_reply_chunk(self, event):
        # Textual runs KyaraApp.on_reply_chunk too (handlers are called along the MRO),
        # after this one: so the text is measured as it will be once appended.
        self.shown.append((time.perf_counter(),
                           len(event.exchange.reply.text) + len(event.text)))

    def action_toggle_side(self):
        self.key_handled.append(time.perf_counter())
        super().action_toggle_side()


async def run(tokens: int, rate: float) -> None:
    ws = Workspace.load()
    with tempfile.TemporaryDirectory() as tmp:
        store = Store.open(Path(tmp) / "store")
        backend = TimedBackend(tokens, rate)
        session = ChatSession(store=store, persona=ws.persona("ayane"),
                              variant=ws.variant("gemma3-270m"), backend=backend)
        app = MeasuredApp(session, variants={}, backend_loader=None)
        key_lat: list[float] = []
        async with app.run_test(size=(80, 24)) as pilot:
            app.query_one("#prompt").value = "ベンチマーク"
            await pilot.press("enter")
            while len(backend.sent) < tokens // 10:
                await asyncio.sleep(0.01)
            while app.current is not None and len(key_lat) < 20:
                pressed = time.perf_counter()
                before = len(app.key_handled)
                app.simulate_key("ctrl+s")  # as a terminal would: no waiting for idle
                while len(app.key_handled) == before:
                    await asyncio.sleep(0.001)
                key_lat.append((app.key_handled[-1] - pressed) * 1000)
                await asyncio.sleep(0.05)
            while app.current is not None:
                await asyncio.sleep(0.01)
    sent = backend.sent
    lags = []
    j = 0
    for i, t_sent in enumerate(sent):  # when did character i+1 first appear on screen?
        while j < len(app.shown) and app.shown[j][1] < i + 1:
            j += 1
        if j < len(app.shown):
            lags.append((app.shown[j][0] - t_sent) * 1000)
    backend_rate = (len(sent) - 1) / (sent[-1] - sent[0])
    first_shown, last_shown = app.shown[0][0], app.shown[-1][0]
    screen_rate = (app.shown[-1][1] - app.shown[0][1]) / (last_shown - first_shown)
    print(f"{tokens} tokens at {rate:.0f} tok/s requested, {len(app.shown)} screen updates")
    print(f"backend {backend_rate:.1f} tok/s, on screen {screen_rate:.1f} tok/s: "
          f"ratio {screen_rate / backend_rate:.3f} (goal >= 0.95)")
    print(f"lag backend -> screen: p50 {statistics.median(lags):.1f} ms, "
          f"p95 {statistics.quantiles(lags, n=20)[-1]:.1f} ms (goal p95 <= 100 ms)")
    print(f"key press during streaming -> action: p50 {statistics.median(key_lat):.1f} ms, "
          f"p95 {statistics.quantiles(key_lat, n=20)[-1]:.1f} ms over {len(key_lat)} presses "
          f"(goal p95 <= 50 ms)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=2000)
    ap.add_argument("--rate", type=float, default=500.0)
    args = ap.parse_args()
    asyncio.run(run(args.tokens, args.rate))


if __name__ == "__main__":
    main()
