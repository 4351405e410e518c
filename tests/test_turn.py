"""One turn (pipelines.turn): the prompt rendered once, by the backend, and logged from the
stream's final Delta; one history rule for what the model is sent, what the console's judge
reads and what the SFT export trains on."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import pytest

from pipelines import turn
from pipelines.chat import ChatSession, TurnDone
from pipelines.datasets import sft_export
from pipelines.inference.base import BackendError, Delta, GenerationOptions
from pipelines.prompting import render_prompt
from pipelines.workspace import Workspace
from store import Store
from tests.conftest import CONFIGS


class RenderingBackend:
    """Renders inside stream() as the local backends do, and reports it in the final Delta;
    counts every render, the ones asked from outside included."""

    name = "rendering"

    def __init__(self, replies: Sequence[str | Exception] = ()) -> None:
        self.replies = list(replies)
        self.renders = 0
        self.sent: list[list[dict]] = []

    def render(self, messages: Sequence[dict]) -> str:
        self.renders += 1
        return render_prompt("gemma", messages, bos_token="<bos>")

    def stream(self, messages, options: GenerationOptions) -> Iterator[Delta]:
        rendered = self.render(messages)
        self.sent.append([dict(m) for m in messages])
        reply = self.replies.pop(0) if self.replies else "ごきげんよう。"
        if isinstance(reply, Exception):
            raise reply
        yield Delta(text=reply)
        yield Delta(done=True, stop_reason="eos", completion_tokens=1,
                    extra={"rendered": rendered})

    def close(self) -> None:
        pass


@pytest.fixture
def ws():
    return Workspace.load(CONFIGS)


@pytest.fixture
def store(tmp_path):
    return Store.open(tmp_path / "store")


def session(ws, store, backend, **kw) -> ChatSession:
    return ChatSession(store=store, persona=ws.persona("ayane"),
                       variant=ws.variant("gemma3-270m"), backend=backend, **kw)


def reply_row(events) -> dict:
    return next(e.message for e in events if isinstance(e, TurnDone))


def test_a_turn_renders_its_prompt_once_and_logs_that_text(ws, store):
    backend = RenderingBackend()
    chat = session(ws, store, backend)
    row = reply_row(chat.send("こんにちは"))
    assert backend.renders == 1  # inside stream(): nothing rendered again to be logged
    assert row["rendered_prompt"] == render_prompt("gemma", backend.sent[0], bos_token="<bos>")
    assert row["status"] == "complete"


def test_a_failed_stream_is_rendered_for_the_log_only_then(ws, store):
    backend = RenderingBackend([BackendError("variant 'x': the model fell over")])
    chat = session(ws, store, backend)
    row = reply_row(chat.send("こんにちは"))
    assert row["status"] == "error" and row["error"] == "variant 'x': the model fell over"
    assert backend.renders == 2  # the one in stream(), then one for the error's log
    assert row["rendered_prompt"].startswith("<bos>")


def test_stream_returns_the_reply_and_keeps_shown_text_on_a_cancel():
    backend = RenderingBackend(["一", "二"])
    messages = [{"role": "user", "content": "こんにちは"}]
    source = turn.stream(backend, messages, GenerationOptions())
    assert next(source).text == "一"
    with pytest.raises(StopIteration) as done:
        next(source)
    reply = done.value.value
    assert (reply.text, reply.stop_reason, reply.error) == ("一", "eos", None)
    assert reply.rendered == render_prompt("gemma", messages, bos_token="<bos>")

    shown: list[str] = []
    cancelled = turn.stream(backend, messages, GenerationOptions(), shown)
    next(cancelled)
    cancelled.close()
    assert shown == ["二"]


def test_history_keeps_the_last_pairs_by_one_rule():
    pairs = [(f"q{i}", f"a{i}") for i in range(10)]
    assert turn.history(pairs)[0] == {"role": "user", "content": "q2"}
    assert len(turn.history(pairs)) == 2 * turn.HISTORY_TURNS
    assert len(turn.history(pairs, None)) == 20 and turn.history(pairs, 0) == []
    assert turn.seen({"status": "incomplete", "content": "途中"})
    assert not turn.seen({"status": "error", "content": "途中"})
    assert not turn.seen({"status": "complete", "content": ""})


def test_the_export_trains_on_what_the_model_was_sent(ws, store):
    """Ten turns, one cut short: the SFT row of the last reply holds exactly the history
    the model was given with it (the last 8 pairs, the incomplete one included), and the
    judge's history for a reply (`history(before_seq=)`) is that too."""
    backend = RenderingBackend([f"返事{i}です。" for i in range(10)])
    chat = session(ws, store, backend)
    rows = []
    for i in range(10):
        events = chat.send(f"質問{i}")
        if i == 4:  # the user stops reading this one after its text arrived
            next(e for e in events if isinstance(e, Delta))
            events.close()
            continue
        rows.append(reply_row(events))
    last = rows[-1]
    sent = [m for m in backend.sent[-1] if m["role"] != "system"]
    assert len(sent) == 2 * turn.HISTORY_TURNS + 1
    assert {"role": "assistant", "content": "返事4です。"} in sent  # the incomplete reply
    assert chat.history(before_seq=last["seq"]) == sent[:-1]
    exported = {r["id"]: r for r in sft_export(store).rows}
    messages = exported[last["id"]]["messages"]
    assert messages[:-1] == sent and messages[-1]["content"] == "返事9です。"
