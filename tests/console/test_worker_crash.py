"""A model whose process dies mid-reply, inside the real console: the app stays, one line
says what happened, the question and the partial reply are stored, the next question is
answered by a fresh worker. Under Pilot here; under tmux in test_tmux_e2e.py."""

from __future__ import annotations

import pytest

from console.app import KyaraApp
from pipelines.chat import ChatSession
from pipelines.inference.worker import spawn_backend
from pipelines.workspace import Workspace
from store import Store
from tests.conftest import CONFIGS
from tests.inference.standin_backends import PARTIAL, REPLY, standin_variant

STANDIN = "gguf=tests.inference.standin_backends:CrashBackend"


@pytest.fixture
def app(tmp_path, monkeypatch):
    monkeypatch.setenv("KYARA_BACKEND_MODULES", STANDIN)
    variant = standin_variant(tmp_path)
    ws = Workspace.load(CONFIGS)
    home = tmp_path / "home"
    store = Store.open(tmp_path / "store")
    session = ChatSession(store=store, persona=ws.persona("ayane"), variant=variant)
    app = KyaraApp(session, variants={"standin": variant},
                   backend_loader=lambda v: spawn_backend(v, home), judge=None,
                   judge_note="no judge", export_dir=tmp_path)
    yield app


async def send(pilot, text):
    pilot.app.query_one("#prompt").value = text
    await pilot.press("enter")
    for _ in range(1000):
        await pilot.pause(0.02)
        if pilot.app.current is None:
            return
    raise AssertionError("reply never finished")


async def test_a_crashing_worker_never_takes_the_console_down(app):
    async with app.run_test(size=(100, 30)) as pilot:
        await send(pilot, "crash now")
        assert app.is_running
        crashed = app.exchanges[0]
        row = crashed.message
        assert row["status"] == "error" and row["content"] == PARTIAL
        assert "killed by SIGSEGV" in row["error"] and "variant 'standin'" in row["error"]
        notes = [n.message for n in app._notifications]
        assert any("killed by SIGSEGV" in n and "\n" not in n for n in notes)
        assert "crash now" in str(crashed.user.render())
        # the next message starts a fresh worker and is answered
        await send(pilot, "こんにちは")
        answered = app.exchanges[1].message
        assert answered["status"] == "complete" and answered["content"] == REPLY
    rows = sorted(app.session.store.rows("messages"), key=lambda r: r["seq"])
    assert [(r["role"], r["status"]) for r in rows] == [
        ("user", "complete"), ("assistant", "error"), ("user", "complete"),
        ("assistant", "complete")]
    assert rows[0]["content"] == "crash now"
