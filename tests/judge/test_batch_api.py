"""The Batch API path (pipelines.judge.batch_api) against a scripted server with /v1/files
and /v1/batches: a completed batch, an expired one (partial output, the rest asked live), a
partly failed one (error file rows asked live), a cancelled one, a restart that re-attaches
to the same batch, the cache (a second run sends nothing, a live run asks nothing again),
and bad answers (garbage, 429 on create, a failed batch) that stop in one line and lose
nothing."""

from __future__ import annotations

import asyncio
import json
import re

import pytest
from judge_testing import one_line
from scripted_batch_server import BatchScript, BatchServer

from pipelines.jobs import JobCancelled
from pipelines.judge.batch_api import BatchError, batch_prices, judge_batch
from pipelines.judge.verdict import Interaction

QUESTIONS = [("お休みの日は何を？", "読書をしておりますわ。"),
             ("好きな食べ物は？", "紅茶とスコーンですわ。"),
             ("将来の夢は？", "ミュージカル女優ですの。")]
CRITERIA = ["personality", "style"]


@pytest.fixture
def server():
    with BatchServer() as srv:
        yield srv


def interactions() -> list[Interaction]:
    return [Interaction.from_pair(q, a, id=f"m{i}") for i, (q, a) in enumerate(QUESTIONS)]


def score_asks(judge):
    return [judge.score_ask(i, c) for i in interactions() for c in CRITERIA]


def drive(judge, asks, state, *, check_cancelled=lambda: None, timeout_s=20.0):
    """Run judge_batch to the end: (events, verdicts); the judge is closed after."""
    loop = asyncio.new_event_loop()
    events = []
    gen = judge_batch(judge, asks, state, loop=loop, poll_s=0.01, timeout_s=timeout_s,
                      stage="judge", check_cancelled=check_cancelled)
    try:
        while True:
            events.append(next(gen))
    except StopIteration as stop:
        return events, stop.value
    finally:
        loop.run_until_complete(judge.aclose())
        loop.close()


def uploaded_lines(server) -> list[dict]:
    return [json.loads(line) for data in server.uploads() for line in data.splitlines()]


def without_delimiters(text: str) -> str:
    return re.sub(r"[0-9a-f]{12}", "<d>", text)


def test_a_completed_batch_answers_every_ask_with_the_live_bodies(make_judge, server, tmp_path):
    judge = make_judge()
    asks = score_asks(judge)
    events, verdicts = drive(judge, asks, tmp_path / "batch.json")
    assert [v.status for v in verdicts] == ["ok"] * 6 and {v.score for v in verdicts} == {4}
    assert [(v.message_id, v.criterion) for v in verdicts] == [
        (f"m{i}", c) for i in range(3) for c in CRITERIA]
    assert server.live == [] and len(server.batches) == 1 and len(server.uploads()) == 1
    # the same request bodies as the live path: model, parameters, prompt (but delimiters)
    rows = uploaded_lines(server)
    assert {r["url"] for r in rows} == {"/v1/chat/completions"} and len(rows) == 6
    assert len({r["custom_id"] for r in rows}) == 6
    live = judge.provider.request_body("x")
    for row, ask in zip(rows, asks, strict=True):
        body = row["body"]
        assert {k: v for k, v in body.items() if k != "messages"} == {
            k: v for k, v in live.items() if k != "messages"}
        assert body["logprobs"] is True and body["max_tokens"] == judge.config.max_tokens
        assert without_delimiters(body["messages"][0]["content"]) == without_delimiters(
            ask.make_prompt())
    # the events say the batch's progress
    progress = [e for e in events if e.type == "progress"]
    assert progress and progress[-1].current == 6 and progress[-1].total == 6
    assert any("batch batch_1: completed" in (e.message or "") for e in events)
    state = json.loads((tmp_path / "batch.json").read_text())
    assert state["batch_id"] == "batch_1" and state["collected"] is True

    # the cache: a second batch run sends nothing, and a live run asks nothing again
    again = make_judge()
    _, verdicts2 = drive(again, score_asks(again), tmp_path / "batch.json")
    assert [v.score for v in verdicts2] == [4] * 6
    assert len(server.uploads()) == 1 and len(server.batches) == 1 and server.live == []
    live_judge = make_judge()

    async def live():
        try:
            return await live_judge.score_items(interactions(), CRITERIA)
        finally:
            await live_judge.aclose()

    assert len(asyncio.run(live())) == 6 and server.live == []


def test_an_expired_batch_keeps_its_partial_output_and_asks_the_rest_live(
        make_judge, server, tmp_path):
    server.script = BatchScript(polls=2, outcome="expired", run=2)
    judge = make_judge()
    events, verdicts = drive(judge, score_asks(judge), tmp_path / "batch.json")
    assert [v.status for v in verdicts] == ["ok"] * 6
    assert len(server.batch_bodies) == 2 and len(server.live) == 4
    assert [v.attempts for v in verdicts[:2]] == [1, 1]
    warning = next(e for e in events if "asked live" in (e.message or ""))
    assert warning.level == "warning" and "batch_1 expired" in warning.message
    assert "batch_expired" in warning.message


def test_error_file_rows_are_asked_live(make_judge, server, tmp_path):
    server.script = BatchScript(fail=lambda body: "紅茶とスコーン" in body["messages"][0]["content"])
    judge = make_judge()
    events, verdicts = drive(judge, score_asks(judge), tmp_path / "batch.json")
    assert [v.status for v in verdicts] == ["ok"] * 6
    assert len(server.live) == 2 and all("紅茶とスコーン" in r.prompt for r in server.live)
    assert any("HTTP 500: scripted server error" in (e.message or "") for e in events)


def test_a_cancelled_batch_keeps_what_ran(make_judge, server, tmp_path):
    """The batch is cancelled at the provider (here: by someone else, while it runs)."""
    server.script = BatchScript(polls=3, run=1)
    judge = make_judge()
    client = judge.provider.batch_client()
    polls = []

    def cancel_on_second_poll():
        polls.append(1)
        if len(polls) == 2 and server.batches:
            client.batches.cancel(next(iter(server.batches)))

    events, verdicts = drive(judge, score_asks(judge), tmp_path / "batch.json",
                             check_cancelled=cancel_on_second_poll)
    client.close()
    assert "POST /v1/batches/batch_1/cancel" in server.calls
    assert [v.status for v in verdicts] == ["ok"] * 6
    assert len(server.batch_bodies) == 1 and len(server.live) == 5
    assert any("batch batch_1 cancelled" in (e.message or "") for e in events)


def test_a_restart_reattaches_to_the_same_batch(make_judge, server, tmp_path):
    server.script = BatchScript(polls=5)
    judge = make_judge()
    calls = []

    def stop_once_submitted():  # the job is killed while the batch runs
        calls.append(1)
        if len(calls) == 3:
            raise JobCancelled()

    with pytest.raises(JobCancelled):
        drive(judge, score_asks(judge), tmp_path / "batch.json",
              check_cancelled=stop_once_submitted)
    state = json.loads((tmp_path / "batch.json").read_text())
    assert state["batch_id"] == "batch_1" and state["collected"] is False
    assert len(server.batches) == 1

    again = make_judge()
    events, verdicts = drive(again, score_asks(again), tmp_path / "batch.json")
    assert [v.status for v in verdicts] == ["ok"] * 6
    assert len(server.batches) == 1 and len(server.uploads()) == 1  # no second batch
    assert any("re-attaching to batch_1" in (e.message or "") for e in events)
    assert server.live == []


def test_429_on_create_is_one_line_and_a_rerun_reuses_the_upload(make_judge, server, tmp_path):
    server.script = BatchScript(create_status=429)
    judge = make_judge()
    with pytest.raises(BatchError) as caught:
        drive(judge, score_asks(judge), tmp_path / "batch.json")
    message = one_line(str(caught.value))
    assert "HTTP 429" in message and "Enqueued token limit" in message
    assert "batch: false" in message and "Traceback" not in message
    state = json.loads((tmp_path / "batch.json").read_text())
    assert state["input_file_id"] == "file-1" and state["batch_id"] is None

    server.script = BatchScript()
    again = make_judge()
    _, verdicts = drive(again, score_asks(again), tmp_path / "batch.json")
    assert [v.status for v in verdicts] == ["ok"] * 6
    assert len(server.uploads()) == 1 and len(server.batches) == 1


def test_garbage_while_polling_stops_in_one_line_and_the_batch_is_kept(
        make_judge, server, tmp_path):
    server.script = BatchScript(garbage_retrieve=True)
    judge = make_judge()
    with pytest.raises(BatchError) as caught:
        drive(judge, score_asks(judge), tmp_path / "batch.json")
    message = one_line(str(caught.value))
    assert "malformed answer when asked to report on the batch" in message
    assert "run the job again to re-attach" in message
    server.script = BatchScript()
    again = make_judge()
    _, verdicts = drive(again, score_asks(again), tmp_path / "batch.json")
    assert [v.status for v in verdicts] == ["ok"] * 6 and len(server.batches) == 1


def test_junk_lines_in_the_output_are_skipped(make_judge, server, tmp_path):
    server.script = BatchScript(garbage_lines=2)
    judge = make_judge()
    events, verdicts = drive(judge, score_asks(judge), tmp_path / "batch.json")
    assert [v.status for v in verdicts] == ["ok"] * 6 and server.live == []
    assert any("2 line(s) of the batch files were not JSON" in (e.message or "")
               for e in events)


def test_a_failed_batch_is_one_line_and_the_next_run_submits_anew(make_judge, server, tmp_path):
    server.script = BatchScript(outcome="failed")
    judge = make_judge()
    with pytest.raises(BatchError) as caught:
        drive(judge, score_asks(judge), tmp_path / "batch.json")
    assert "batch batch_1 failed: scripted: the model is not available" in one_line(
        str(caught.value))
    server.script = BatchScript()
    again = make_judge()
    _, verdicts = drive(again, score_asks(again), tmp_path / "batch.json")
    assert [v.status for v in verdicts] == ["ok"] * 6 and len(server.batches) == 2


def test_a_server_without_the_batch_api_is_one_line(make_judge, tmp_path):
    """vLLM's OpenAI server has no /v1/files: FastAPI's 404 {"detail": "Not Found"}."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class NotFound(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            data = b'{"detail":"Not Found"}'
            self.send_response(404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    plain = ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=plain.serve_forever, daemon=True).start()
    try:
        judge = make_judge(base_url=f"http://127.0.0.1:{plain.server_address[1]}/v1")
        with pytest.raises(BatchError) as caught:
            drive(judge, score_asks(judge), tmp_path / "batch.json")
    finally:
        plain.shutdown()
        plain.server_close()
    message = one_line(str(caught.value))
    assert "refused to upload the batch file (HTTP 404" in message and "Batch API" in message


def test_timeout_leaves_the_batch_running(make_judge, server, tmp_path):
    server.script = BatchScript(polls=10_000)
    judge = make_judge()
    with pytest.raises(BatchError) as caught:
        drive(judge, score_asks(judge), tmp_path / "batch.json", timeout_s=0.05)
    message = one_line(str(caught.value))
    assert "still in_progress" in message and "re-attach" in message
    assert "POST /v1/batches/batch_1/cancel" not in server.calls


def test_pairwise_asks_go_through_the_batch_too(make_judge, server, tmp_path):
    from pipelines.judge.pairwise import choice_of

    server.responder = lambda request: __import__("scripted_judge_server").Reply(
        text="比べました。\nA\nA")
    judge = make_judge()
    conversation = Interaction.from_pair("好きな食べ物は？", "")
    asks = [judge.prefer_ask(conversation, "紅茶ですわ。", "お茶", "personality", message_id="p1"),
            judge.prefer_ask(conversation, "お茶", "紅茶ですわ。", "personality", message_id="p1")]
    _, verdicts = drive(judge, asks, tmp_path / "batch.json")
    assert [choice_of(v) for v in verdicts] == ["A", "A"] and server.live == []
    assert verdicts[0].criterion == "pairwise:personality"
    again = make_judge()

    async def live():
        try:
            return await again.prefer(conversation, "紅茶ですわ。", "お茶", "personality",
                                      message_id="p1")
        finally:
            await again.aclose()

    assert choice_of(asyncio.run(live())) == "A" and server.live == []  # from the cache


def test_batch_prices_are_half_unless_given():
    from pipelines.config import JudgeConfig

    base = {"name": "j", "provider": "openai", "model": "m", "criteria": ["personality"]}
    prices, source = batch_prices(JudgeConfig(**base, prices={"input": 0.15, "output": 0.6}))
    assert (prices.input, prices.output, source) == (0.075, 0.3, "half the live prices")
    given = JudgeConfig(**base, prices={"input": 0.15, "output": 0.6},
                        batch_prices={"input": 0.1, "output": 0.2})
    assert batch_prices(given)[1] == "batch_prices from the judge config"
    assert batch_prices(JudgeConfig(**base)) == (None, "no prices")


def test_the_same_words_under_two_messages_are_one_request(make_judge, server, tmp_path):
    judge = make_judge()
    twins = [Interaction.from_pair("趣味は？", "読書ですわ。", id=mid) for mid in ("a", "b")]
    asks = [judge.score_ask(i, "personality") for i in twins]
    _, verdicts = drive(judge, asks, tmp_path / "batch.json")
    assert len(uploaded_lines(server)) == 1
    assert [(v.message_id, v.score) for v in verdicts] == [("a", 4), ("b", 4)]
