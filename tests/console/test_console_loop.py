"""The console's event loop stays free: the jobs screen, the history and the re-reading of
variants after a job read the store, /proc and events.jsonl in thread workers, never on the
loop; and what the jobs screen and a comparison show: a multi-line log message as written,
a single metric value as text (no chart), a variant that cannot load named with its reason."""

from __future__ import annotations

import threading
import uuid
from datetime import datetime, timedelta, timezone

from console.jobs_screen import JobsScreen
from pipelines import events as ev
from pipelines.jobs.runner import record_run
from store import Store
from tests.console.test_jobs_screen import app_for, wait, ws_with_variant  # noqa: F401
from tests.jobs.conftest import FAKE_MODULES, configs, job_file, workspace  # noqa: F401

TABLE = ("data preparation:\n"
         "                            before     after\n"
         "conversations                  400       384\n"
         "ending with 。                  71%      100%\n"
         "changes: [bold]dropped[/] 16")


class GatedStore:
    """The store, but every `rows` read records its thread and waits for the gate."""

    def __init__(self, store, gate: threading.Event | None = None) -> None:
        self._store = store
        self.gate = gate
        self.threads: list[int] = []

    def rows(self, *args, **kwargs):
        self.threads.append(threading.get_ident())
        if self.gate is not None:
            assert self.gate.wait(30), "the test never opened the gate"
        return self._store.rows(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._store, name)


def finished_run(store, home, name: str, events: list[ev.Event], minutes_ago: int = 0):
    """A run that ended before the console opened: its row and its events file."""
    run_id = str(uuid.uuid4())
    run_dir = home / "runs" / f"{name}-{run_id[:8]}"
    with ev.EventWriter(run_dir / ev.EVENTS_FILE, run_id) as writer:
        for event in [ev.start("train", name), *events, ev.done({"ok": True})]:
            writer.write(event)
    record_run(store, run_id, kind="train", name=name, status="done", run_dir=str(run_dir),
               created_at=datetime.now(timezone.utc) - timedelta(minutes=minutes_ago))
    return run_id


async def test_jobs_screen_reads_off_the_loop_and_keys_work_while_it_reads(
        ws_with_variant, job_file, tmp_path, monkeypatch):  # noqa: F811
    import console.jobs

    monkeypatch.setenv("KYARA_JOB_MODULES", FAKE_MODULES)
    store = Store.open(ws_with_variant.settings.store_path())
    run = console.jobs.launch(job_file("slow", steps=10), ws_with_variant, store=store)
    tails: list[int] = []
    real_tail = console.jobs.tail

    def recorded_tail(*args, **kwargs):
        tails.append(threading.get_ident())
        return real_tail(*args, **kwargs)

    monkeypatch.setattr(console.jobs, "tail", recorded_tail)
    gate = threading.Event()
    slow = GatedStore(store, gate)
    app = app_for(ws_with_variant, tmp_path)
    try:
        async with app.run_test(size=(80, 24)) as pilot:
            loop_thread = threading.get_ident()
            screen = JobsScreen(ws_with_variant, slow)
            await app.push_screen(screen)
            await pilot.pause()
            assert slow.threads and not gate.is_set()  # a store read is under way, held
            await pilot.press("n")  # handled while that read waits
            await pilot.pause()
            assert screen.query("#job-picker")
            await pilot.press("escape")
            await pilot.pause()
            assert not screen.query("#job-picker")
            gate.set()
            await wait(pilot, lambda: screen.runs and screen.runs[0].id == run.id
                       and screen.runs[0].status == "done", steps=600)
            await wait(pilot, lambda: "done" in str(screen.query_one("#run-log").render()))
    finally:
        gate.set()
    assert tails and slow.threads
    assert loop_thread not in set(slow.threads) | set(tails)


async def test_a_multi_line_log_message_keeps_its_lines(ws_with_variant, tmp_path):  # noqa: F811
    store = Store.open(ws_with_variant.settings.store_path())
    home = ws_with_variant.settings.home_path()
    finished_run(store, home, "prep", [ev.log(TABLE), ev.log("one\x1b[31m line")])
    app = app_for(ws_with_variant, tmp_path)
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("ctrl+j")
        screen = app.screen
        await wait(pilot, lambda: "done" in str(screen.query_one("#run-log").render()))
        lines = str(screen.query_one("#run-log").render()).splitlines()
        shown = [line.rstrip() for line in lines]
        # the table as written: one row a line, its columns lined up; markup stays text
        for row in TABLE.splitlines()[1:]:
            assert row in shown
        assert any(line.endswith("info data preparation:") for line in shown)
        assert any(line.endswith("info one\\x1b[31m line") for line in shown)


async def test_a_single_metric_value_is_text_and_no_chart(ws_with_variant, tmp_path):  # noqa: F811
    store = Store.open(ws_with_variant.settings.store_path())
    home = ws_with_variant.settings.home_path()
    curve = finished_run(store, home, "curve",
                         [ev.metric("conversations", 384)]
                         + [ev.metric("loss", 1.0 / step, step=step) for step in (1, 2, 4)],
                         minutes_ago=5)
    finished_run(store, home, "single", [ev.metric("conversations", 384)])
    app = app_for(ws_with_variant, tmp_path)
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("ctrl+j")
        screen = app.screen
        await wait(pilot, lambda: len(screen.runs) == 2 and screen.views
                   and str(screen.query_one("#run-figures").render()))
        chart = screen.query_one("#run-chart")
        assert screen.runs[0].name == "single"  # the newest: shown first
        assert str(screen.query_one("#run-figures").render()) == "conversations: 384"
        assert not chart.display  # no three-row block for one number
        screen.query_one("#runs").highlighted = 1
        await wait(pilot, lambda: screen.selected_id == curve and chart.display)
        assert chart.data == [1.0, 0.5, 0.25]
        figures = str(screen.query_one("#run-figures").render())
        assert "loss: 0.25" in figures and "conversations: 384" in figures


async def test_history_reads_the_store_off_the_loop(ws_with_variant, tmp_path):  # noqa: F811
    from console.history import HistoryScreen

    app = app_for(ws_with_variant, tmp_path)
    gate = threading.Event()
    slow = GatedStore(app.session.store, gate)
    try:
        async with app.run_test(size=(80, 24)) as pilot:
            loop_thread = threading.get_ident()
            screen = HistoryScreen(slow, "ayane")
            await app.push_screen(screen)  # opens at once, the read held at the gate
            await pilot.pause()
            assert slow.threads and not screen.loaded
            assert "reading" in str(screen.query_one("#history-title").render())
            gate.set()
            await wait(pilot, lambda: screen.loaded)
            assert "0 sessions" in str(screen.query_one("#history-title").render())
    finally:
        gate.set()
    assert loop_thread not in slow.threads


async def test_job_finished_reads_the_variant_files_off_the_loop(ws_with_variant, tmp_path):  # noqa: F811
    app = app_for(ws_with_variant, tmp_path)
    threads: list[int] = []
    real = ws_with_variant.variants

    def variants():
        threads.append(threading.get_ident())
        return real()

    ws_with_variant.variants = variants
    async with app.run_test(size=(80, 24)) as pilot:
        loop_thread = threading.get_ident()
        app.job_finished(None)
        app.job_finished(None)  # two runs ending together
        await wait(pilot, lambda: "m" in app.variants)
    assert threads and loop_thread not in threads


async def test_a_compare_pane_whose_variant_cannot_load_names_the_reason(tmp_path):
    from console.app import KyaraApp
    from console.compare import CompareScreen
    from pipelines.chat import ChatSession, Combo
    from pipelines.inference.base import BackendError
    from pipelines.pool import BackendPool
    from pipelines.workspace import Workspace
    from tests.conftest import CONFIGS
    from tests.console.test_chat_app import ScriptedBackend

    ws = Workspace.load(CONFIGS)
    store = Store.open(tmp_path / "store")
    good, bad = ws.variant("gemma3-270m"), ws.variant("gemma-2-2b-jpn-it-ayane")
    reason = "variant 'gemma-2-2b-jpn-it-ayane': adapter directory not found: /no/[bold]where"

    def loader(variant):
        if variant.name == bad.name:
            raise BackendError(reason)
        return ScriptedBackend([["はい", "ですわ。"]])

    session = ChatSession(store=store, persona=ws.persona("ayane"), variant=good,
                          pool=BackendPool(loader), kind="compare")
    app = KyaraApp(ChatSession(store=store, persona=ws.persona("ayane"), variant=good,
                               backend=ScriptedBackend()),
                   variants={}, backend_loader=loader, export_dir=tmp_path)
    async with app.run_test(size=(100, 30)) as pilot:
        screen = CompareScreen(session, [Combo(good, False), Combo(bad, False)])
        await app.push_screen(screen)
        screen.query_one("#compare-prompt").value = "好きな食べ物は？"
        await pilot.press("enter")
        await wait(pilot, lambda: screen.rounds and not screen.busy)
        ok, failed = screen.rounds[0]
        assert failed.reply.state == "error"
        assert str(failed.reason.render()) == reason  # markup in it stays text
        assert failed.reason.display and not ok.reason.display
        assert ok.reply.text == "はいですわ。"
        await pilot.press("escape")
        await pilot.pause()
        # reopened from the history: the reason is still there
        reopened = ChatSession.resume(store, session.session_id, persona=session.persona,
                                      variant=good, backend=None, kind="compare")
        again = CompareScreen(reopened, [])
        await app.push_screen(again)
        await pilot.pause()
        assert str(again.rounds[0][1].reason.render()) == reason
        assert again.rounds[0][1].reason.display
