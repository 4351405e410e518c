"""The console with the real judge stack: a reply in the Textual app is judged over HTTP by
the scripted judge server; badges show each score as it arrives, weighted where the judge
gave logprobs, and the verdicts land in the store next to the reply."""

from __future__ import annotations

from scripted_judge_server import answer, probabilities

from console.app import KyaraApp
from pipelines.chat import ChatSession
from pipelines.judge.live import LiveJudge
from pipelines.workspace import Workspace
from store import Store
from tests.console.test_chat_app import ScriptedBackend, type_and_send, wait_idle


def by_criterion(request):
    if "personalities and preferences" in request.prompt:
        return answer("お嬢様らしい。", 6, score_logprobs=probabilities({"6": 0.5, "7": 0.5}))
    return answer("口調が少し硬い。", 4)


async def test_live_badges_from_the_judge_server(server, configs, tmp_path):
    server.responder = by_criterion
    app_yaml = configs / "kyara.yaml"
    app_yaml.write_text(app_yaml.read_text(encoding="utf-8").replace(
        "default_judge: gpt-4o-mini", "default_judge: scripted"), encoding="utf-8")
    ws = Workspace.load(configs)
    store = Store.open(ws.settings.store_path())
    persona = ws.persona("ayane")
    judge, note = LiveJudge.from_workspace(ws, persona, store)
    assert judge is not None and note is None
    assert judge.label == "judge scripted: uncalibrated"
    session = ChatSession(store=store, persona=persona, variant=ws.variant("gemma3-270m"),
                          backend=ScriptedBackend([["レオと散歩ですわ。"]]))
    app = KyaraApp(session, variants={}, backend_loader=None, judge=judge, export_dir=tmp_path)
    async with app.run_test(size=(80, 24)) as pilot:
        await type_and_send(pilot, "週末は何をしているの？")
        await wait_idle(pilot, app)
        badges = app.exchanges[0].badges
        for _ in range(200):
            await pilot.pause(0.05)
            if len(badges.verdicts) == 2:
                break
        shown = str(badges.render())
        assert "personality 6.5" in shown and "style 4" in shown
        assert "uncalibrated" in str(app.query_one("#status").render())
    reply_id = app.exchanges[0].message["id"]
    rows = store.rows("judgments")
    assert {(r["criterion"], r["score"], r["message_id"]) for r in rows} == {
        ("personality", 6, reply_id), ("style", 4, reply_id)}
    assert len(server.requests) == 2
    assert "週末は何をしているの？" in server.requests[0].prompt


def test_no_key_means_no_judge_and_a_hint(workspace, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    judge, note = LiveJudge.from_workspace(workspace, workspace.persona("ayane"), None)
    assert judge is None and "OPENAI_API_KEY" in note
