"""The simulated user of the eval job's `simulated` set: any judge config's model writes the
user's next turn from the scenario and the conversation so far. A retryable provider error
(429, 5xx, a timeout, a malformed answer) is asked again as the judge asks again
(`max_retries` of the simulator's config; waits doubling from BACKOFF_S with jitter, or the
server's Retry-After, capped); what still fails is that reply's error, in one line."""

from __future__ import annotations

import asyncio
import random
from typing import Any

from pipelines.config import ConfigError
from pipelines.jobs import JobContext
from pipelines.jobs.eval.setup import Item, Setup
from pipelines.judge.providers import ProviderError, make_provider

SIMULATOR_PROMPT = """\
You play a user chatting with the character {name}. Stay in your role as the user, never
as {name}. Your situation: {scenario}

The conversation so far:
{conversation}

Write only your next message to {name}, in Japanese, one or two sentences, with no quotes
and no name label."""
BACKOFF_S = 0.5         # the judge's defaults (pipelines.judge.runner.Judge)
BACKOFF_CAP_S = 20.0
RETRY_AFTER_CAP_S = 60.0


def open_simulator(setup: Setup, ctx: JobContext) -> Any:
    """The simulated user's provider, or None when the run has no simulator."""
    if setup.simulator is None:
        return None
    return make_provider(setup.simulator, home=ctx.home)


def ask_simulator(provider: Any, setup: Setup, item: Item, history: list[dict[str, str]]
                  ) -> str:
    """The simulated user's next turn: the first line of its answer."""
    if provider is None:
        raise ConfigError("the simulated set needs simulator:")
    lines = "\n".join(f"[{'you' if m['role'] == 'user' else setup.persona.name}] {m['content']}"
                      for m in history)
    prompt = SIMULATOR_PROMPT.format(name=setup.persona.name, scenario=item.scenario or "",
                                     conversation=lines or "(nothing yet)")
    retries = setup.simulator.max_retries if setup.simulator is not None else 0
    completion = asyncio.run(_complete(provider, prompt, retries))
    text = completion.text.strip().splitlines()
    if not text or not text[0].strip():
        raise RuntimeError("the simulator answered nothing")
    return text[0].strip()


def retry_delay(attempt: int, retry_after: float | None) -> float:
    """The wait before attempt `attempt` + 1, by the judge's rule."""
    if retry_after is not None:
        return min(retry_after, RETRY_AFTER_CAP_S)
    return min(BACKOFF_CAP_S, BACKOFF_S * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)


async def _complete(provider: Any, prompt: str, retries: int) -> Any:
    """One answer, retried while the error is retryable and retries are left; the
    provider closed after (each call runs on its own event loop)."""
    try:
        attempts = 0
        while True:
            attempts += 1
            try:
                return await provider.complete(prompt)
            except ProviderError as exc:
                if not exc.retryable or exc.fatal or attempts > retries:
                    raise
                await asyncio.sleep(retry_delay(attempts, exc.retry_after))
    finally:
        await provider.aclose()


def close_simulator(provider: Any) -> None:
    close = getattr(provider, "close", None)
    if callable(close):
        close()
