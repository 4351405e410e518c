"""Live scoring for the console: each criterion's verdict as soon as it is known.

The console calls `score_live` from a Textual async worker right after a reply has been
stored; the requests are asynchronous HTTP (or a llama.cpp call in a worker thread), and
store reads and writes run in worker threads, so the app's event loop keeps drawing the
stream while the judge works. Stopping the iteration (or cancelling the worker) cancels
the criteria still running.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from pipelines.judge.runner import Judge
from pipelines.judge.verdict import Interaction, JudgeError, Verdict


async def score_live(judge: Judge, messages: Sequence[Mapping[str, Any]], *, message_id: str,
                     criteria: Sequence[str] | None = None) -> AsyncIterator[Verdict]:
    """Yield one Verdict per criterion, in the order they finish. `messages` are the chat
    turns up to and including the reply (system messages are left out); `message_id` is
    the reply's id in the messages table. Verdicts are in the store once this ends."""
    interaction = Interaction.from_messages(messages, id=message_id)
    names = list(criteria or judge.criteria)
    tasks = [asyncio.create_task(judge.score(interaction, name)) for name in names]
    try:
        for next_done in asyncio.as_completed(tasks):
            yield await next_done
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await judge.flush()


def score_sync(judge: Judge, messages: Sequence[Mapping[str, Any]], *, message_id: str,
               criteria: Sequence[str] | None = None) -> list[Verdict]:
    """The same for scripts: blocks until every criterion is judged. Not for use inside a
    running event loop (use score_live there)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        raise JudgeError("score_sync was called inside an event loop; use score_live")

    async def collect() -> list[Verdict]:
        try:
            return [v async for v in score_live(judge, messages, message_id=message_id,
                                                criteria=criteria)]
        finally:
            await judge.provider.aclose()  # its connections die with this loop

    return asyncio.run(collect())


class LiveJudge:
    """What the console holds: one judge bound to the persona, its criteria, a label with
    its calibration, and verdicts streamed per reply."""

    def __init__(self, judge: Judge) -> None:
        self.judge = judge
        self.criteria = list(judge.criteria)

    @property
    def label(self) -> str:
        status = self.judge.calibration(self.criteria[0])
        return f"judge {self.judge.name}: {status.label}"

    async def stream_verdicts(self, question: str, reply: str, message_id: str,
                              history: Sequence[Mapping[str, Any]] = ()
                              ) -> AsyncIterator[Verdict]:
        messages = [*history, {"role": "user", "content": question},
                    {"role": "assistant", "content": reply}]
        async for verdict in score_live(self.judge, messages, message_id=message_id):
            yield verdict

    @classmethod
    def from_workspace(cls, workspace: Any, persona: Any, store: Any
                       ) -> tuple[LiveJudge | None, str | None]:
        """The configured judge, or None and one line saying how to configure one (shown
        in place of the badges)."""
        from pipelines.config import ConfigError

        name = workspace.settings.default_judge
        if not name:
            return None, "no judge: set default_judge in configs/kyara.yaml"
        try:
            config = workspace.judge(name)
            # A criterion file that does not load is left out (the console names it); the
            # judge scores the others. With none left, opening says what is wrong.
            good, _ = workspace.criteria()
            broken = set(workspace.criterion_files()) - set(good)
            usable = [c for c in config.criteria if c not in broken] or None
            return cls(Judge.open(workspace, name, persona.id, criteria=usable,
                                  store=store, isolated=True)), None
        except (JudgeError, ConfigError) as exc:
            return None, f"no judge: {exc}"
