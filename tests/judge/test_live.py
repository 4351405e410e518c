"""The console's live API: each criterion's verdict as it finishes, without blocking the
event loop; cancelling stops the rest; the sync wrapper for scripts."""

from __future__ import annotations

import asyncio
import threading

import pytest
from scripted_judge_server import answer

from pipelines.judge import JudgeError, score_live, score_sync

CHAT = [
    {"role": "system", "content": "お嬢様のように振る舞ってほしいです。"},
    {"role": "user", "content": "好きなケーキは？"},
    {"role": "assistant", "content": "いちごのショートケーキが大好きですわ。"},
]


def by_criterion(request):
    """Personality answers slowly, style at once; each says which one it was."""
    if "personalities and preferences" in request.prompt:
        return answer("性格。", 6, delay=0.4)
    return answer("口調。", 3)


def held_until(release: threading.Event, released: list[bool]):
    """Personality is answered only once `release` is set (or after 30 s, a safety net
    that records False); style at once."""
    def respond(request):
        if "personalities and preferences" in request.prompt:
            released.append(release.wait(30))
            return answer("性格。", 6)
        return answer("口調。", 3)

    return respond


async def test_verdicts_arrive_as_each_criterion_finishes(server, make_judge):
    release, released = threading.Event(), []
    server.responder = held_until(release, released)
    judge = make_judge()
    arrivals = []
    async for verdict in score_live(judge, CHAT, message_id="msg-1"):
        arrivals.append((verdict.criterion, verdict.score))
        release.set()  # personality is answered only after style's verdict is out
    assert arrivals == [("style", 3), ("personality", 6)]
    assert released == [True]  # style's verdict came while personality was still held
    # The system text is not part of what is judged; the verdicts are stored.
    assert all("お嬢様のように振る舞って" not in r.prompt.split("[Interactions]")[1]
               for r in server.requests)
    rows = judge.store.rows("judgments")
    assert sorted((r["message_id"], r["criterion"]) for r in rows) == [
        ("msg-1", "personality"), ("msg-1", "style")]
    await judge.aclose()


async def test_the_callers_loop_keeps_running(server, make_judge):
    # The server answers only once a task on the caller's loop has run while the requests
    # were in flight: a judge that blocked the loop would leave them held (False).
    release, released = threading.Event(), []

    def respond(request):
        released.append(release.wait(30))
        return answer("理由。", 5)

    server.responder = respond
    judge = make_judge(store=False)

    async def ticker():
        while server.in_flight < 2:  # both criteria asked, none answered
            await asyncio.sleep(0.01)
        release.set()

    task = asyncio.create_task(ticker())
    verdicts = [v async for v in score_live(judge, CHAT, message_id="m")]
    task.cancel()
    assert len(verdicts) == 2 and released == [True, True]


async def test_cancelling_the_worker_cancels_the_criteria_still_running(server, make_judge):
    server.responder = by_criterion
    judge = make_judge(store=False)
    first = asyncio.Event()

    async def worker():
        async for _ in score_live(judge, CHAT, message_id="m"):
            first.set()

    task = asyncio.create_task(worker())
    await asyncio.wait_for(first.wait(), 2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0)
    pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()
               and "score" in repr(t.get_coro())]
    assert pending == []


def test_score_sync_for_scripts_works_twice(server, make_judge):
    judge = make_judge()
    first = score_sync(judge, CHAT, message_id="s1")
    second = score_sync(judge, CHAT[:2] + [{"role": "assistant", "content": "紅茶ですわ。"}],
                        message_id="s2")  # a second event loop: a fresh HTTP client
    assert [v.status for v in first + second] == ["ok"] * 4
    assert len(judge.store.rows("judgments")) == 4


async def test_score_sync_inside_a_loop_says_use_score_live(make_judge):
    with pytest.raises(JudgeError, match="score_live"):
        score_sync(make_judge(store=False), CHAT, message_id="x")


async def test_a_chat_not_ending_with_a_reply_is_refused(make_judge):
    with pytest.raises(JudgeError, match="assistant reply"):
        async for _ in score_live(make_judge(store=False), CHAT[:2], message_id="x"):
            pass
