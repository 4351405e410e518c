"""Pilot tests of the chat console with a scripted backend and judge: streaming, badges,
cancel, retrieval toggle, variant switch, markup injection, resume, errors on screen."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass

import pytest

from console.app import KyaraApp, ReplyChunk, ReplyDone
from console.widgets import Exchange
from pipelines.chat import ChatSession
from pipelines.inference.base import BackendError, Delta
from pipelines.pool import BackendPool
from pipelines.prompting import render_prompt
from pipelines.workspace import Workspace
from store import Store
from tests.conftest import CONFIGS


class ScriptedBackend:
    name = "scripted"

    def __init__(self, replies=None, delay=0.0, gate: threading.Event | None = None,
                 free=0):
        self.replies = list(replies or [])
        self.delay = delay
        self.gate = gate  # pieces after the first `free` wait for it
        self.free = free
        self.produced = 0
        self.seen: list[list[dict]] = []

    def render(self, messages):
        return render_prompt("gemma", messages, bos_token="<bos>")

    def stream(self, messages, options):
        self.seen.append([dict(m) for m in messages])
        reply = self.replies.pop(0) if self.replies else ["はい", "ですわ。"]
        if isinstance(reply, Exception):
            raise reply
        for piece in reply:
            if self.gate is not None and self.produced >= self.free:
                self.gate.wait(5)
            if self.delay:
                import time

                time.sleep(self.delay)
            self.produced += 1
            yield Delta(text=piece)
        yield Delta(done=True, stop_reason="eos", completion_tokens=len(reply),
                    prompt_tokens=10, ttft_s=0.012, tokens_per_s=42.0)

    def close(self):
        pass


@dataclass
class Verdict:
    criterion: str
    status: str
    score: int | None
    weighted_score: float | None = None
    error_kind: str | None = None
    reasoning: str = ""
    raw_text: str = ""


class ScriptedJudge:
    criteria = ["personality", "style"]
    label = "judge scripted (ρ 0.81)"

    def __init__(self):
        self.calls = []

    async def stream_verdicts(self, question, reply, message_id, history):
        self.calls.append((question, reply, message_id))
        await asyncio.sleep(0.01)
        yield Verdict("personality", "ok", 6, 5.7, reasoning="[bold]丁寧[/bold]な口調。")
        await asyncio.sleep(0.01)
        yield Verdict("style", "failed", None, error_kind="rate_limited")


@pytest.fixture
def ws():
    return Workspace.load(CONFIGS)


@pytest.fixture
def store(tmp_path):
    return Store.open(tmp_path / "store")


def make_app(ws, store, backend, judge=None, tmp_path=None, **session_kw):
    session = ChatSession(store=store, persona=ws.persona("ayane"),
                          variant=ws.variant("gemma3-270m"), backend=backend, **session_kw)
    variants = {n: ws.variant(n) for n in ("gemma3-270m", "gemma-2-2b-jpn-it")}
    loaded = []

    def loader(v):
        loaded.append(v.name)
        return ScriptedBackend([["別の", "モデル", "ですわ。"]])

    app = KyaraApp(session, variants=variants, backend_loader=loader, judge=judge,
                   judge_note=None if judge else "no judge: set OPENAI_API_KEY",
                   export_dir=tmp_path)
    app.loaded = loaded
    return app


async def type_and_send(pilot, text):
    app = pilot.app
    app.query_one("#prompt").value = text
    await pilot.press("enter")


async def wait_idle(pilot, app):
    for _ in range(200):
        await pilot.pause(0.02)
        if app.current is None:
            return
    raise AssertionError("reply never finished")


async def test_stream_status_badges_and_judge(ws, store, tmp_path):
    seen = []
    backend = ScriptedBackend([["ごきげんよう", "、", "絢音", "ですわ。"]])
    judge = ScriptedJudge()
    app = make_app(ws, store, backend, judge, tmp_path)
    async with app.run_test(size=(80, 24), message_hook=seen.append) as pilot:
        await type_and_send(pilot, "こんにちは")
        await wait_idle(pilot, app)
        await pilot.pause(0.1)
        exchange = app.exchanges[0]
        assert exchange.reply.text == "ごきげんよう、絢音ですわ。"
        assert any(isinstance(m, ReplyChunk) for m in seen)
        assert any(isinstance(m, ReplyDone) for m in seen)
        status = str(app.query_one("#status").render())
        assert "gemma3-270m" in status and "TTFT 12 ms" in status and "42.0 tok/s" in status
        assert "RAG off" in status
        assert "eos" in status and "RAG off" in status and "ρ 0.81" in status
        badges = exchange.badges
        assert badges.verdicts["personality"].score == 6
        shown = str(badges.render())
        assert "personality 5.7" in shown and "style ✗ rate_limited" in shown
        assert "length✓" in shown and "ends✓" in shown and "stop✓" in shown
        assert judge.calls[0][0] == "こんにちは"
        assert judge.calls[0][2] == exchange.message["id"]
    rows = store.rows("messages")
    assert {r["role"] for r in rows} == {"user", "assistant"}


async def test_markup_in_model_text_is_shown_literally(ws, store, tmp_path):
    evil = "[bold]x[/bold] [@click=app.quit]quit[/] \x1b[31mred"
    app = make_app(ws, store, ScriptedBackend([[evil]]), None, tmp_path)
    async with app.run_test(size=(80, 24)) as pilot:
        await type_and_send(pilot, "[red]question[/red]")
        await wait_idle(pilot, app)
        exchange = app.exchanges[0]
        shown = str(exchange.reply.render())
        assert "[bold]x[/bold]" in shown and "[@click=app.quit]" in shown
        assert "\x1b" not in shown and "\\x1b[31m" in shown
        assert "[red]question[/red]" in str(exchange.user.render())
        await pilot.click(Exchange)  # clicking the text must not run the embedded action
        assert app.is_running


async def test_escape_cancels_and_keeps_the_partial_reply(ws, store, tmp_path):
    gate = threading.Event()
    backend = ScriptedBackend([["一", "二", "三", "四", "五", "六"]], gate=gate, free=2)
    app = make_app(ws, store, backend, None, tmp_path)
    async with app.run_test(size=(80, 24)) as pilot:
        await type_and_send(pilot, "長い話をして")
        for _ in range(200):  # two pieces out, the third held back: the model is "busy"
            await pilot.pause(0.01)
            if backend.produced == 2:
                break
        await pilot.press("escape")
        gate.set()  # the model produces one more token, then must stop
        await wait_idle(pilot, app)
        row = app.exchanges[0].message
        assert row["status"] == "incomplete" and row["stop_reason"] == "cancel"
        assert backend.produced == 3  # stopped within one token of the key press
        assert row["content"] in ("一二", "一二三")
        assert "[中断]" in str(app.exchanges[0].reply.render())
        # the app still works: the next message goes through
        backend.replies.append(["はい。"])
        await type_and_send(pilot, "続けて")
        await wait_idle(pilot, app)
        assert app.exchanges[1].message["status"] == "complete"


async def test_backend_error_is_a_notification_not_a_crash(ws, store, tmp_path):
    backend = ScriptedBackend([BackendError("variant 'x': model file not found: /m.gguf")])
    app = make_app(ws, store, backend, None, tmp_path)
    async with app.run_test(size=(80, 24)) as pilot:
        await type_and_send(pilot, "こんにちは")
        await wait_idle(pilot, app)
        assert app.exchanges[0].message["status"] == "error"
        notes = [n.message for n in app._notifications]
        assert any("model file not found" in n for n in notes)
        assert app.is_running
    assert store.rows("messages", where="role = 'user'")[0]["content"] == "こんにちは"


async def test_rag_toggle_needs_an_index_and_variant_switch_applies_next(ws, store, tmp_path):
    backend = ScriptedBackend([["一つ目ですわ。"]])
    app = make_app(ws, store, backend, None, tmp_path)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("ctrl+r")
        assert app.session.rag is False  # not indexed: refused with a hint
        assert any("kyara index ayane" in n.message for n in app._notifications)
        await type_and_send(pilot, "一")
        await wait_idle(pilot, app)
        await pilot.press("ctrl+t")
        await pilot.pause()
        picker = app.query_one("VariantPicker")
        picker.highlighted = 1
        await pilot.press("enter")
        await pilot.pause()
        assert app.session.variant.name == "gemma-2-2b-jpn-it"
        assert "gemma-2-2b-jpn-it" in str(app.query_one("#status").render())
        await type_and_send(pilot, "二")
        await wait_idle(pilot, app)
        assert app.loaded == ["gemma-2-2b-jpn-it"]
        rows = [m for m in app.session.messages() if m["role"] == "assistant"]
        assert [r["variant"] for r in rows] == ["gemma3-270m", "gemma-2-2b-jpn-it"]
        assert rows[1]["content"] == "別のモデルですわ。"


async def test_no_judge_badges_say_how_to_configure(ws, store, tmp_path):
    app = make_app(ws, store, ScriptedBackend(), None, tmp_path)
    async with app.run_test(size=(80, 24)) as pilot:
        await type_and_send(pilot, "こんにちは")
        await wait_idle(pilot, app)
        assert "OPENAI_API_KEY" in str(app.exchanges[0].badges.render())


async def test_resume_shows_the_past_and_export(ws, store, tmp_path):
    first = ChatSession(store=store, persona=ws.persona("ayane"),
                        variant=ws.variant("gemma3-270m"), backend=ScriptedBackend([["前回ですわ。"]]))
    list(first.send("前の質問"))
    resumed = ChatSession.resume(store, first.session_id, persona=first.persona,
                                 variant=first.variant, backend=ScriptedBackend())
    app = KyaraApp(resumed, variants={}, backend_loader=None, export_dir=tmp_path)
    async with app.run_test(size=(80, 24)) as pilot:
        assert [e.question for e in app.exchanges] == ["前の質問"]
        assert app.exchanges[0].reply.text == "前回ですわ。"
        await pilot.press("ctrl+o")
        await pilot.pause()
    exported = (tmp_path / f"kyara-{first.session_id[:8]}.md").read_text(encoding="utf-8")
    assert "**あなた**: 前の質問" in exported and "前回ですわ。" in exported
    assert "variant gemma3-270m" in exported


async def test_compare_side_by_side_and_reopen(ws, store, tmp_path):
    from console.compare import CompareScreen

    # the compare set picks only a tuned variant this machine can load: its model and
    # adapter folders are here
    for folder in ("base", "adapter"):
        (tmp_path / folder).mkdir()
    variants = {n: ws.variant(n).model_copy(update={"model": str(tmp_path / "base")})
                for n in ("gemma-2-2b-jpn-it", "gemma-2-2b-jpn-it-ayane")}
    variants["gemma-2-2b-jpn-it-ayane"].adapter = str(tmp_path / "adapter")
    session = ChatSession(store=store, persona=ws.persona("ayane"),
                          variant=variants["gemma-2-2b-jpn-it"], backend=ScriptedBackend())
    loaded = []

    def loader(v):
        loaded.append(v.name)
        return ScriptedBackend([[v.name[-5:], "ですわ。"]] * 4)

    judge = ScriptedJudge()
    app = KyaraApp(session, variants=variants, backend_loader=loader, judge=judge,
                   export_dir=tmp_path)
    app.pool = BackendPool(loader)  # nothing loaded yet: both variants come from the loader
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("ctrl+k")
        await pilot.pause()
        screen = app.screen
        assert isinstance(screen, CompareScreen)
        assert [c.label for c in screen.combos] == ["gemma-2-2b-jpn-it · RAG off",
                                                    "gemma-2-2b-jpn-it-ayane · RAG off"]
        screen.query_one("#compare-prompt").value = "好きな食べ物は？"
        await pilot.press("enter")
        for _ in range(300):
            await pilot.pause(0.02)
            if not screen.busy and all(c.badges.verdicts for c in screen.rounds[0]):
                break
        columns = screen.rounds[0]
        assert [c.reply.text for c in columns] == ["pn-itですわ。", "ayaneですわ。"]
        assert all("personality 5.7" in str(c.badges.render()) for c in columns)
        assert loaded == ["gemma-2-2b-jpn-it", "gemma-2-2b-jpn-it-ayane"]
        compare_id = screen.session.session_id
        await pilot.press("escape")
        await pilot.pause()
        assert not isinstance(app.screen, CompareScreen)
    # reopened later: the stored comparison comes back column by column
    from pipelines.chat import ChatSession as CS

    reopened = CS.resume(store, compare_id, persona=session.persona,
                         variant=session.variant, backend=None, kind="compare")
    app2 = KyaraApp(session, variants=variants, backend_loader=loader, export_dir=tmp_path)
    async with app2.run_test(size=(80, 24)) as pilot:
        screen = CompareScreen(reopened, [])
        await app2.push_screen(screen)
        await pilot.pause()
        assert [c.reply.text for c in screen.rounds[0]] == ["pn-itですわ。", "ayaneですわ。"]
        assert [c.label for c in screen.rounds[0]] == ["gemma-2-2b-jpn-it · RAG off",
                                                       "gemma-2-2b-jpn-it-ayane · RAG off"]


async def test_history_lists_sessions_and_reopens_one(ws, store, tmp_path):
    from console.history import HistoryScreen

    old = ChatSession(store=store, persona=ws.persona("ayane"),
                      variant=ws.variant("gemma3-270m"), backend=ScriptedBackend([["昔の話ですわ。"]]))
    list(old.send("昔の質問"))
    app = make_app(ws, store, ScriptedBackend([["今ですわ。"]]), None, tmp_path)
    async with app.run_test(size=(80, 24)) as pilot:
        await type_and_send(pilot, "今の質問")
        await wait_idle(pilot, app)
        await pilot.press("ctrl+g")
        await pilot.pause()
        screen = app.screen
        assert isinstance(screen, HistoryScreen)
        for _ in range(100):  # the sessions are read by a thread worker
            if screen.loaded:
                break
            await pilot.pause(0.02)
        titles = [r["title"] for r in screen.rows]
        assert titles == ["今の質問", "昔の質問"]  # newest first
        screen.query_one("#history").highlighted = 1
        await pilot.press("enter")
        await pilot.pause()
        assert not isinstance(app.screen, HistoryScreen)
        assert app.session.session_id == old.session_id
        assert [e.question for e in app.exchanges] == ["昔の質問"]
        assert app.exchanges[0].reply.text == "昔の話ですわ。"


async def test_command_palette_switches_variant(ws, store, tmp_path):
    app = make_app(ws, store, ScriptedBackend(), None, tmp_path)
    async with app.run_test(size=(80, 24)) as pilot:
        titles = [c.title for c in app.get_system_commands(app.screen)]
        assert "Variant: gemma-2-2b-jpn-it" in titles and "Compare variants" in titles
        await pilot.press("ctrl+p")
        await pilot.pause()
        await pilot.press(*"Variant: gemma-2-2b")
        await pilot.pause(0.5)
        await pilot.press("enter")
        await pilot.pause()
        assert app.session.variant.name == "gemma-2-2b-jpn-it"


async def test_keymap_from_settings_remaps_keys(ws, store, tmp_path):
    session = ChatSession(store=store, persona=ws.persona("ayane"),
                          variant=ws.variant("gemma3-270m"), backend=ScriptedBackend(),
                          retriever=object())
    app = KyaraApp(session, variants={}, backend_loader=None, export_dir=tmp_path,
                   keymap={"toggle_rag": "ctrl+b"})
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("ctrl+r")
        assert session.rag is False  # the old key no longer toggles
        await pilot.press("ctrl+b")
        assert session.rag is True


async def test_side_panel_shows_facts_and_reasoning_of_the_selected_reply(ws, store, tmp_path):
    from pipelines.retrieval import Hit

    hits = [Hit(fact_id="k027", text="絢音の愛犬は[bold]レオ[/bold]である。", topic="pets",
                score=0.03, text_rank=1, vector_rank=1)]

    class Facts:
        def search(self, query, k=None):
            return hits

    session = ChatSession(store=store, persona=ws.persona("ayane"),
                          variant=ws.variant("gemma3-270m"),
                          backend=ScriptedBackend([["レオですわ。"], ["はい。"]]),
                          retriever=Facts(), rag=True)
    app = KyaraApp(session, variants={}, backend_loader=None, judge=ScriptedJudge(),
                   export_dir=tmp_path)
    async with app.run_test(size=(100, 30)) as pilot:
        await type_and_send(pilot, "犬の名前は？")
        await wait_idle(pilot, app)
        for _ in range(100):
            await pilot.pause(0.02)
            if len(app.exchanges[0].badges.verdicts) == 2:
                break
        app.session.rag = False
        await type_and_send(pilot, "ありがとう")
        await wait_idle(pilot, app)
        app.exchanges[0].focus()  # select the first reply
        await pilot.press("ctrl+s")
        await pilot.pause()
        side = str(app.query_one("#side-text").render())
        assert "k027" in side and "[bold]レオ[/bold]" in side  # shown literally
        assert "personality: ok 6" in side and "[bold]丁寧[/bold]な口調。" in side
        app.exchanges[1].focus()
        await pilot.pause()
        side = str(app.query_one("#side-text").render())
        assert "none: retrieval off" in side
