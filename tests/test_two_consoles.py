"""Two consoles on one session take turns (issue 27, item 9): a turn holds the session's
lock while it streams, the other waits, and a turn after another console's reads the session
again, so its history and numbering follow on instead of interleaving."""

from __future__ import annotations

import threading
import time

from pipelines.chat import ChatSession, TurnDone
from pipelines.inference.base import Delta
from pipelines.workspace import Workspace
from store import Store
from tests.conftest import CONFIGS
from tests.test_turn import RenderingBackend


def open_twice(tmp_path):
    ws = Workspace.load(CONFIGS)
    store = Store.open(tmp_path / "store")
    first = ChatSession(store=store, persona=ws.persona("ayane"),
                        variant=ws.variant("gemma3-270m"), backend=RenderingBackend())
    list(first.send("最初の質問"))  # the session exists now
    kwargs = {"persona": ws.persona("ayane"), "variant": ws.variant("gemma3-270m")}
    a = ChatSession.resume(store, first.session_id, backend=RenderingBackend(), **kwargs)
    b = ChatSession.resume(store, first.session_id, backend=RenderingBackend(), **kwargs)
    return store, first.session_id, a, b


def test_a_turn_after_another_consoles_sees_it(tmp_path):
    store, sid, a, b = open_twice(tmp_path)
    list(a.send("Aの質問"))
    list(b.send("Bの質問"))  # b was resumed before a's turn
    rows = sorted(store.rows("messages", where=f"session_id = '{sid}'"),
                  key=lambda r: r["seq"])
    assert [r["content"] for r in rows if r["role"] == "user"] == [
        "最初の質問", "Aの質問", "Bの質問"]
    assert len({r["seq"] for r in rows}) == len(rows)  # no seq written twice
    sent = b.backend.sent[-1]
    assert {"role": "user", "content": "Aの質問"} in sent  # b's model saw a's turn


def test_a_second_console_waits_for_the_turn_streaming(tmp_path):
    store, sid, a, b = open_twice(tmp_path)
    events = a.send("Aの質問")
    next(e for e in events if isinstance(e, Delta))  # a's turn is streaming
    done = threading.Event()

    def other() -> None:
        list(b.send("Bの質問"))
        done.set()

    thread = threading.Thread(target=other)
    thread.start()
    time.sleep(0.5)
    assert not done.is_set()  # b waits for a's turn
    assert any(isinstance(e, TurnDone) for e in list(events))  # a's turn ends
    thread.join(10)
    assert done.is_set()
    rows = sorted(store.rows("messages", where=f"session_id = '{sid}'"),
                  key=lambda r: r["seq"])
    assert [r["role"] for r in rows] == ["user", "assistant"] * 3
