"""A few pixel checks at 80x24 (what an SSH user sees), after the behaviour tests."""

from __future__ import annotations

import pytest

from console.app import KyaraApp
from pipelines.chat import ChatSession
from pipelines.workspace import Workspace
from store import Store
from tests.conftest import CONFIGS
from tests.console.test_chat_app import ScriptedBackend, ScriptedJudge


@pytest.fixture
def app_factory(tmp_path):
    ws = Workspace.load(CONFIGS)

    def make(judge=None):
        store = Store.open(tmp_path / "store")
        session = ChatSession(store=store, persona=ws.persona("ayane"),
                              variant=ws.variant("gemma3-270m"),
                              backend=ScriptedBackend([["ごきげんよう", "、絢音ですわ。"]]))
        return KyaraApp(session, variants={"gemma3-270m": ws.variant("gemma3-270m")},
                        backend_loader=None, judge=judge,
                        judge_note=None if judge else "no judge: set OPENAI_API_KEY",
                        export_dir=tmp_path)

    return make


def test_empty_console(snap_compare, app_factory):
    assert snap_compare(app_factory(), terminal_size=(80, 24))


def test_one_judged_exchange(snap_compare, app_factory):
    app = app_factory(ScriptedJudge())

    async def run_before(pilot):
        app.query_one("#prompt").value = "こんにちは"
        await pilot.press("enter")
        for _ in range(200):
            await pilot.pause(0.02)
            if app.current is None and len(app.exchanges[0].badges.verdicts) == 2:
                break
        app.clear_notifications()
        await pilot.pause()

    assert snap_compare(app, run_before=run_before, terminal_size=(80, 24))
