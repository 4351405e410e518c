"""The API key never reaches a log, a message shown to the user, the store or the output
file: a canary key, echoed back by the server in its error bodies (as OpenAI's 401 does),
is looked for everywhere."""

from __future__ import annotations

import json
import logging
import secrets

from judge_testing import KEY_ENV
from scripted_judge_server import Reply, answer

from pipelines.judge import Interaction

ITEMS = [Interaction.from_pair(f"質問{i}", f"返答{i}ですわ。", id=f"c{i}") for i in range(6)]


def echo_key_responder(request):
    """Answers by the item: ok, invalid, or an error whose body quotes the key it got."""
    sent = (request.auth or "").removeprefix("Bearer ")
    prompt = request.prompt
    if "返答0" in prompt:
        return answer("理由。", 5)
    if "返答1" in prompt:
        return Reply(text="点数なし")
    if "返答2" in prompt:
        return Reply(status=500, body=json.dumps(
            {"error": {"message": f"internal error for key {sent}"}}).encode())
    if "返答3" in prompt:
        return Reply(status=400, body=json.dumps(
            {"error": {"message": f"bad request from {sent}"}}).encode())
    if "返答4" in prompt:
        return Reply(status=502, content_type="text/html",
                     body=f"<html>upstream refused {sent}</html>".encode())
    return Reply(status=401, body=json.dumps(
        {"error": {"message": f"Incorrect API key provided: {sent}"}}).encode())


async def test_the_canary_key_is_nowhere(server, make_judge, monkeypatch, caplog, capsys,
                                         tmp_path):
    canary = "sk-CANARY-" + secrets.token_hex(16)
    monkeypatch.setenv(KEY_ENV, canary)
    caplog.set_level(logging.DEBUG)  # every logger, the openai client's and httpx's included
    server.responder = echo_key_responder
    judge = make_judge(max_retries=0, concurrency=1)  # in order, the 401 last
    results = await judge.score_items(ITEMS, ["personality"])
    await judge.aclose()

    assert all(r.auth == f"Bearer {canary}" for r in server.requests)  # it was sent
    statuses = {k[0]: v.status for k, v in results.items()}
    assert statuses["c0"] == "ok" and statuses["c1"] == "invalid" and statuses["c5"] == "failed"
    shown = [v.error or "" for v in results.values()] + [str(v) for v in results.values()]
    assert any("HTTP 500: internal error for key ***" in s for s in shown)
    assert any("HTTP 400" in s for s in shown) and any("HTTP 502" in s for s in shown)
    rows = judge.store.rows("judgments")
    assert rows
    out = tmp_path / "verdicts.jsonl"
    from pipelines.judge.batch import Item, write_output

    write_output(out, [Item(i, {"q": i.question}) for i in ITEMS], ["personality"], results)
    captured = capsys.readouterr()
    places = {
        "verdicts": "\n".join(shown),
        "store rows": json.dumps(rows, default=str, ensure_ascii=False),
        "output file": out.read_text(encoding="utf-8"),
        "logs": caplog.text,
        "stdout": captured.out,
        "stderr": captured.err,
    }
    for where, text in places.items():
        assert canary not in text, f"the key leaked into {where}"
        assert canary[10:30] not in text, f"part of the key leaked into {where}"
    for path in judge.store.path.rglob("*"):  # the raw bytes of every store file
        if path.is_file():
            assert canary.encode() not in path.read_bytes(), f"the key is in {path}"


def test_the_canary_key_is_not_in_the_cli_output(server, configs, tmp_path, monkeypatch):
    from judge_testing import REPO, run_kyara

    canary = "sk-CANARY-" + secrets.token_hex(16)
    monkeypatch.setenv(KEY_ENV, canary)
    server.responder = echo_key_responder
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"id": i.id, "question": i.question, "reply": i.reply},
                                       ensure_ascii=False) + "\n" for i in ITEMS), encoding="utf-8")
    out = tmp_path / "out.jsonl"
    result = run_kyara("judge", str(data), "--judge", "scripted", "--criteria", "personality",
                       "-o", str(out), env={"KYARA_CONFIGS": str(configs)}, cwd=REPO)
    assert server.count >= 1
    assert result.returncode == 2  # the 401 stops the judge: a user error, one line
    assert f"401 unauthorized — check {KEY_ENV}" in result.stderr
    for text in (result.stdout, result.stderr, out.read_text(encoding="utf-8")):
        assert canary not in text and canary[10:30] not in text
