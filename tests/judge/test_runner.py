"""The Judge against the scripted server: verdicts, weighted scores, retries and their
limits, error kinds, the concurrency bound, the cache and the store."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
from judge_testing import KEY, KEY_ENV, one_line
from scripted_judge_server import Reply, answer, probabilities

from pipelines.judge import Interaction

ITEM = Interaction.from_pair("好きな紅茶は？", "ダージリンをストレートでいただくのが一番ですわ。", id="m1")


def items(n: int, tag: str = "") -> list[Interaction]:
    return [Interaction.from_pair(f"質問{i}{tag}", f"返答{i}{tag}ですわ。", id=f"item{i}{tag}")
            for i in range(n)]


async def test_a_verdict_with_reasoning_score_and_weighted_score(server, make_judge):
    server.queue.append(answer("1. 性格は明るい。\n2. 口調が合っている。", 6,
                               score_logprobs=probabilities({"6": 0.6, "7": 0.3, "5": 0.1})))
    judge = make_judge()
    verdict = await judge.score(ITEM, "personality")
    await judge.aclose()
    assert verdict.status == "ok" and verdict.score == 6
    assert verdict.weighted_score == pytest.approx(6 * 0.6 + 7 * 0.3 + 5 * 0.1)
    assert verdict.reasoning == "1. 性格は明るい。\n2. 口調が合っている。"
    assert verdict.raw_text.endswith("6\n6")
    assert verdict.attempts == 1 and verdict.tokens == 321 and verdict.latency_ms > 0
    assert verdict.judge_model == "scripted-judge" and verdict.prompt_version == "personality-v2"
    assert verdict.message_id == "m1" and len(verdict.cache_key) == 64

    sent = server.requests[0]
    assert sent.path == "/v1/chat/completions" and sent.auth == f"Bearer {KEY}"
    body = sent.body
    assert body["model"] == "scripted-judge" and body["temperature"] == 0.0
    assert body["logprobs"] is True and body["top_logprobs"] == 20
    assert body["max_tokens"] > 500 and body["seed"] == 0
    assert [m["role"] for m in body["messages"]] == ["user"]

    rows = judge.store.rows("judgments")
    assert len(rows) == 1
    row = rows[0]
    assert row["message_id"] == "m1" and row["criterion"] == "personality"
    assert row["status"] == "ok" and row["score"] == 6
    assert row["weighted_score"] == pytest.approx(verdict.weighted_score)
    assert row["reasoning"] == verdict.reasoning and row["raw_text"] == verdict.raw_text
    assert row["judge_model"] == "scripted-judge" and row["prompt_version"] == "personality-v2"
    assert row["tokens"] == 321 and row["attempts"] == 1 and row["latency_ms"] > 0
    assert row["cache_key"] == verdict.cache_key


async def test_byte_split_logprobs_still_find_the_score(server, make_judge):
    server.queue.append(answer("お嬢様らしい口調ですわ。", 5, split_bytes=True,
                               score_logprobs=probabilities({"5": 0.5, "4": 0.5})))
    judge = make_judge(store=False)
    verdict = await judge.score(ITEM, "style")
    assert verdict.score == 5 and verdict.weighted_score == pytest.approx(4.5)


async def test_no_logprobs_keeps_the_discrete_score_only(server, make_judge):
    server.queue.append(answer("理由。", 3))
    verdict = await make_judge(store=False).score(ITEM, "personality")
    assert verdict.score == 3 and verdict.weighted_score is None


async def test_an_answer_without_a_score_is_invalid_with_its_text(server, make_judge):
    server.queue.append(Reply(text="理由を長く述べましたが、点数を書き忘れました。"))
    judge = make_judge()
    verdict = await judge.score(ITEM, "personality")
    await judge.flush()
    assert verdict.status == "invalid" and verdict.score is None
    assert verdict.raw_text == "理由を長く述べましたが、点数を書き忘れました。"
    assert verdict.error_kind == "no_score" and verdict.attempts == 1
    assert judge.store.rows("judgments")[0]["status"] == "invalid"
    again = await judge.score(ITEM, "personality")  # invalid is a verdict: not asked again
    assert again.status == "invalid" and server.count == 1


# --- retries -------------------------------------------------------------------------------


def waits(caplog) -> list[str]:
    """The waits the judge chose before each retry, as it logs them."""
    return [m.split("again in ")[1] for m in caplog.messages if "again in " in m]


async def test_429_honours_retry_after(server, make_judge, caplog):
    caplog.set_level(logging.INFO, logger="kyara.judge")
    server.queue.append(Reply(status=429, headers={"Retry-After": "1"}))
    server.queue.append(answer("理由。", 5))
    judge = make_judge(store=False)
    verdict = await judge.score(ITEM, "personality")
    assert verdict.status == "ok" and verdict.attempts == 2 and server.count == 2
    assert waits(caplog) == ["1.00 s"]  # the server's 1 s, not the 10 ms back-off


async def test_retry_after_is_capped(server, make_judge, caplog):
    caplog.set_level(logging.INFO, logger="kyara.judge")
    server.queue.append(Reply(status=429, headers={"Retry-After": "3600"}))
    server.queue.append(answer("理由。", 5))
    judge = make_judge(store=False, options={"retry_after_cap_s": 0.1})
    verdict = await judge.score(ITEM, "personality")
    assert verdict.status == "ok" and verdict.attempts == 2
    assert waits(caplog) == ["0.10 s"]  # the cap, not the server's hour


async def test_5xx_and_an_html_502_page_are_retried(server, make_judge):
    server.queue.append(Reply(status=500))
    server.queue.append(Reply(status=502, content_type="text/html",
                              body=b"<html><body><h1>502 Bad Gateway</h1></body></html>"))
    server.queue.append(answer("理由。", 4))
    verdict = await make_judge(store=False).score(ITEM, "personality")
    assert verdict.status == "ok" and verdict.score == 4 and verdict.attempts == 3


@pytest.mark.parametrize("reply, kind", [
    (Reply(status=503), "server_error"),
    (Reply(status=502, content_type="text/html", body=b"<html><h1>502 Bad Gateway</h1></html>"),
     "server_error"),
    (Reply(status=429), "rate_limited"),
    (Reply(body=b'{"id": "x", "choices": [ {'), "malformed"),
    (Reply(body=b"<html>maintenance</html>", content_type="text/html"), "malformed"),
    (Reply(body=b'{"id": "x", "object": "chat.completion", "created": 0, "model": "m", '
                b'"choices": []}'), "malformed"),
    (Reply(text=""), "empty"),
    (Reply(text="   \n "), "empty"),
])
async def test_a_lasting_fault_fails_after_max_retries(server, make_judge, reply, kind):
    server.responder = lambda request: reply
    judge = make_judge(max_retries=2)
    verdict = await judge.score(ITEM, "personality")
    await judge.flush()
    assert verdict.status == "failed" and verdict.score is None and verdict.weighted_score is None
    assert verdict.error_kind == kind and verdict.attempts == 3 and server.count == 3
    assert "<html" not in verdict.error and one_line(verdict.error)
    row = judge.store.rows("judgments")[0]
    assert row["status"] == "failed" and row["score"] is None and row["error_kind"] == kind


async def test_a_slow_answer_past_the_timeout_is_retried(server, make_judge):
    server.queue.append(answer("遅い。", 2, delay=1.5))
    server.queue.append(answer("速い。", 6))
    judge = make_judge(store=False, timeout_s=0.3)
    verdict = await judge.score(ITEM, "personality")
    assert verdict.status == "ok" and verdict.score == 6 and verdict.attempts == 2
    # it did not wait for the slow answer: the retry reached the server while the first
    # request was still being answered
    assert server.max_in_flight == 2


async def test_a_server_that_never_answers_in_time_fails_as_timeout(server, make_judge):
    server.responder = lambda request: answer("遅い。", 2, delay=0.6)
    verdict = await make_judge(store=False, timeout_s=0.2, max_retries=1).score(ITEM, "personality")
    assert verdict.status == "failed" and verdict.error_kind == "timeout" and verdict.attempts == 2
    assert "within 0.2 s" in verdict.error


async def test_connection_refused_is_retried_then_fails(make_judge, unused_port):
    judge = make_judge(store=False, base_url=f"http://127.0.0.1:{unused_port}/v1", max_retries=1)
    verdict = await judge.score(ITEM, "personality")
    assert verdict.status == "failed" and verdict.error_kind == "connection"
    assert verdict.attempts == 2 and "cannot reach" in one_line(verdict.error)


@pytest.mark.parametrize("status, kind", [(400, "bad_request"), (422, "bad_request"),
                                          (401, "unauthorized"), (403, "forbidden"),
                                          (404, "not_found")])
async def test_client_errors_are_not_retried(server, make_judge, status, kind):
    server.responder = lambda request: Reply(status=status)
    verdict = await make_judge(store=False).score(ITEM, "personality")
    assert verdict.status == "failed" and verdict.error_kind == kind
    assert verdict.attempts == 1 and server.count == 1
    one_line(verdict.error)


async def test_401_says_which_variable_and_stops_the_judge(server, make_judge):
    server.responder = lambda request: Reply(status=401)
    judge = make_judge(concurrency=1)
    results = await judge.score_items(items(6), ["personality"])
    await judge.flush()
    assert server.count == 1  # the other items did not knock on the same door
    verdicts = list(results.values())
    assert all(v.status == "failed" and v.error_kind == "unauthorized" for v in verdicts)
    assert {v.error for v in verdicts} == {
        f"judge scripted: 401 unauthorized — check {KEY_ENV}"}
    assert sorted(v.attempts for v in verdicts) == [0, 0, 0, 0, 0, 1]
    assert len(judge.store.rows("judgments")) == 1  # only what was asked is recorded


async def test_a_server_that_refuses_logprobs_is_asked_without(server, make_judge):
    def respond(request):
        if request.body.get("logprobs"):
            return Reply(status=400, body=b'{"error": {"message": "logprobs is not supported"}}')
        return answer("理由。", 5)

    server.responder = respond
    verdict = await make_judge(store=False).score(ITEM, "personality")
    assert verdict.status == "ok" and verdict.score == 5 and server.count == 2


# --- concurrency ----------------------------------------------------------------------------


async def test_in_flight_requests_never_exceed_concurrency(server, make_judge):
    server.delay = 0.05
    judge = make_judge(store=False, concurrency=3)
    results = await judge.score_items(items(24), ["personality"])
    assert len(results) == 24 and all(v.status == "ok" for v in results.values())
    assert server.max_in_flight == 3


async def test_score_items_reports_each_verdict_as_it_comes(server, make_judge):
    seen = []
    judge = make_judge(store=False)
    results = await judge.score_items(items(5), ["personality", "style"],
                                      on_verdict=lambda item, v: seen.append((item.id, v.criterion)))
    assert sorted(seen) == sorted(results) and len(seen) == 10


# --- the cache ------------------------------------------------------------------------------


async def test_a_second_run_makes_no_requests(server, make_judge):
    first = make_judge()
    done = await first.score_items(items(8), ["personality", "style"])
    await first.aclose()
    assert server.count == 16
    second = make_judge()  # a new judge on the same store: a later run
    again = await second.score_items(items(8), ["personality", "style"])
    assert server.count == 16 and second.requests == 0
    assert {k: v.score for k, v in again.items()} == {k: v.score for k, v in done.items()}
    assert all(v.cached for v in again.values())


async def test_failed_verdicts_are_asked_again_next_run(server, make_judge):
    server.responder = lambda request: (Reply(status=500) if "返答3" in request.prompt
                                        else answer("理由。", 5))
    first = make_judge(max_retries=1)
    results = await first.score_items(items(5), ["personality"])
    await first.aclose()
    assert results[("item3", "personality")].status == "failed"
    asked = server.count
    server.responder = lambda request: answer("理由。", 2)
    second = make_judge()
    results = await second.score_items(items(5), ["personality"])
    await second.aclose()
    assert server.count == asked + 1 and "返答3" in server.requests[-1].prompt
    assert results[("item3", "personality")].score == 2
    rows = second.store.rows("judgments")
    assert len(rows) == 5 and {r["status"] for r in rows} == {"ok"}  # the failed row replaced


async def test_the_same_words_under_another_message_id_reuse_the_verdict(server, make_judge):
    judge = make_judge()
    first = await judge.score(ITEM, "personality")
    again = await judge.score(ITEM, "personality", message_id="m2")
    await judge.flush()
    assert server.count == 1 and again.score == first.score and again.message_id == "m2"
    assert sorted(r["message_id"] for r in judge.store.rows("judgments")) == ["m1", "m2"]


async def test_a_new_prompt_version_or_another_criterion_is_a_new_request(server, make_judge,
                                                                          configs):
    judge = make_judge()
    await judge.score(ITEM, "personality")
    await judge.score(ITEM, "style")
    await judge.aclose()
    assert server.count == 2
    path = configs / "judges" / "criteria" / "personality.yaml"
    path.write_text(path.read_text(encoding="utf-8").replace("personality-v2", "personality-v3"),
                    encoding="utf-8")
    judge = make_judge()
    verdict = await judge.score(ITEM, "personality")
    assert server.count == 3 and verdict.prompt_version == "personality-v3"


async def test_the_event_loop_keeps_running_while_judging(server, make_judge):
    server.delay = 0.3
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    task = asyncio.create_task(ticker())
    judge = make_judge()
    await judge.score(ITEM, "personality")
    await judge.aclose()
    task.cancel()
    assert ticks >= 15


# --- set-up errors and small parts ------------------------------------------------------


def test_the_official_api_without_a_key_says_which_variable(make_judge, monkeypatch):
    from pipelines.judge import JudgeError

    monkeypatch.delenv("KYARA_ABSENT_KEY", raising=False)
    with pytest.raises(JudgeError) as err:
        make_judge(provider="openai", base_url=None, api_key_env="KYARA_ABSENT_KEY")
    assert "set KYARA_ABSENT_KEY" in one_line(str(err.value))


def test_an_openai_compatible_judge_needs_a_base_url(make_judge):
    from pipelines.judge import JudgeError

    with pytest.raises(JudgeError, match="needs base_url"):
        make_judge(base_url=None)


def test_retry_after_forms():
    from email.utils import formatdate

    from pipelines.judge.providers import retry_after

    assert retry_after({"retry-after": "3"}) == 3.0
    assert retry_after({"retry-after": "0.5"}) == 0.5
    assert retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert 8 <= retry_after({"retry-after": formatdate(time.time() + 10, usegmt=True)}) <= 10
    assert retry_after({"retry-after": "soon"}) is None and retry_after({}) is None


def test_backoff_doubles_with_jitter_up_to_the_cap(make_judge):
    judge = make_judge(store=False, options={"backoff_s": 1.0, "backoff_cap_s": 5.0})
    for attempt, ceiling in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 5.0), (9, 5.0)]:
        delays = {judge._delay(attempt, None) for _ in range(50)}
        assert all(ceiling / 2 <= d <= ceiling for d in delays) and len(delays) > 1
    assert judge._delay(1, 0.25) == 0.25


def test_a_judge_without_calibration_says_uncalibrated(make_judge):
    status = make_judge(store=False).calibration("personality")
    assert status.state == "uncalibrated" and status.label == "uncalibrated"


# --- anchors of its own, or zero-shot ----------------------------------------------------


def examples_of(body: dict) -> str:
    text = body["messages"][0]["content"]
    return text.split("[Scored examples]")[1].split("[Interactions]")[0]


async def test_a_criterion_without_rows_runs_zero_shot_and_says_so(server, make_judge, caplog):
    caplog.set_level(logging.WARNING, logger="kyara.judge")
    server.queue.extend([answer("理由。", 5), answer("理由。", 4)])
    judge = make_judge(store=False)  # ayane's calibration.jsonl labels personality only
    assert judge.zero_shot == {"style"}
    first = await judge.score(ITEM, "style")
    await judge.score(items(1)[0], "style")
    assert first.status == "ok" and first.prompt_version == "style-v3"
    for sent in server.requests:
        shown = examples_of(sent.body)
        assert "(none)" in shown and "Score (personality)" not in shown  # nothing borrowed
    warned = [m for m in caplog.messages if "zero-shot" in m]
    assert len(warned) == 1 and "style" in warned[0]  # once per criterion
    status = judge.calibration("style")
    assert status.state == "uncalibrated" and status.label.startswith("uncalibrated")
    assert "zero-shot" in status.label


async def test_a_criterion_with_rows_keeps_its_own_anchors(server, make_judge, caplog):
    caplog.set_level(logging.WARNING, logger="kyara.judge")
    server.queue.append(answer("理由。", 6))
    judge = make_judge(store=False)
    assert "personality" not in judge.zero_shot
    await judge.score(ITEM, "personality")
    shown = examples_of(server.requests[0].body)
    assert shown.count("Score (personality)") == 3 and "(none)" not in shown
    assert judge.prompt(ITEM, "personality").anchor_ids
    assert not [m for m in caplog.messages if "zero-shot" in m]
    assert judge.calibration("personality").label == "uncalibrated"


def test_zero_shot_is_only_wanted_anchors_missing(make_judge):
    assert make_judge(store=False, few_shot=0).zero_shot == set()  # none asked for
