"""The jobs screen: start a job from configs/jobs (a real detached process), watch its
progress and log, see it finish and re-attach; cancel a running one."""

from __future__ import annotations

import pytest

from console.app import KyaraApp
from console.jobs_screen import JobsScreen
from pipelines.chat import ChatSession
from store import Store
from tests.console.test_chat_app import ScriptedBackend
from tests.jobs.conftest import FAKE_MODULES, configs, job_file, workspace  # noqa: F401


async def wait(pilot, predicate, steps=400):
    for _ in range(steps):
        await pilot.pause(0.05)
        if predicate():
            return
    app = pilot.app
    screen = app.screen
    info = [(r.name, r.status, r.run_dir) for r in getattr(screen, "runs", [])]
    views = {k: v.lines[-5:] for k, v in getattr(screen, "views", {}).items()}
    raise AssertionError(f"condition never met: {info} {views} "
                         f"{[n.message for n in app._notifications]}")


def app_for(workspace, tmp_path):  # noqa: F811
    store = Store.open(workspace.settings.store_path())
    session = ChatSession(store=store, persona=workspace.persona("ayane"),
                          variant=workspace.variant("m"), backend=ScriptedBackend())
    return KyaraApp(session, variants={}, backend_loader=None, workspace=workspace,
                    export_dir=tmp_path)


@pytest.fixture
def ws_with_variant(workspace, configs):  # noqa: F811
    (configs / "models").mkdir()
    (configs / "models" / "m.yaml").write_text(
        "name: m\nbackend: gguf\npath: /x.gguf\nchat_template: gemma\n", encoding="utf-8")
    return workspace


async def test_start_watch_and_reattach(ws_with_variant, tmp_path):
    app = app_for(ws_with_variant, tmp_path)
    async with app.run_test(size=(80, 24)) as pilot:
        titles = [c.title for c in app.get_system_commands(app.screen)]
        assert "Run job: index-tiny" in titles  # a palette entry per job file
        await pilot.press("ctrl+j")
        await pilot.pause()
        screen = app.screen
        assert isinstance(screen, JobsScreen)
        await pilot.press("n")
        await pilot.pause()
        await pilot.press("enter")  # the only job file: index-tiny
        # steps: the first e5-onnx build alone takes ~15 s, longer on a loaded machine
        await wait(pilot, lambda: screen.runs and screen.runs[0].status == "done", steps=1200)
        run = screen.runs[0]
        view = screen.views[run.id]
        assert view.finished and view.progress[0] == view.progress[1] == 5
        log = str(screen.query_one("#run-log").render())
        assert "done" in log and "added" in log
    # a new console re-attaches: the run and its whole log come back from the files
    again = app_for(ws_with_variant, tmp_path)
    async with again.run_test(size=(80, 24)) as pilot:
        await pilot.press("ctrl+j")
        await pilot.pause(0.8)
        screen = again.screen
        assert screen.runs[0].id == run.id and screen.runs[0].status == "done"
        assert screen.views[run.id].finished


async def test_cancel_a_running_job(ws_with_variant, job_file, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("KYARA_JOB_MODULES", FAKE_MODULES)
    path = job_file("slow", steps=200)
    app = app_for(ws_with_variant, tmp_path)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("ctrl+j")
        await pilot.pause()
        screen = app.screen
        screen.start_job(path)
        await wait(pilot, lambda: screen.runs and screen.runs[0].status == "running")
        await pilot.press("c")
        await wait(pilot, lambda: screen.runs[0].status == "cancelled")
        assert any("SIGTERM" in n.message for n in app._notifications)


async def test_a_variant_registered_by_a_job_is_offered_at_once(ws_with_variant, tmp_path):
    app = app_for(ws_with_variant, tmp_path)
    app.variants = {"m": ws_with_variant.variant("m")}
    async with app.run_test(size=(80, 24)) as pilot:
        models = ws_with_variant.settings.home_path() / "models"
        models.mkdir(parents=True, exist_ok=True)
        (models / "trained.yaml").write_text(  # what a finished train job writes
            "name: trained\nbackend: gguf\npath: /t.gguf\nchat_template: gemma\n",
            encoding="utf-8")
        app.job_finished(None)
        await pilot.pause()
        assert "trained" in app.variants
        assert any("new variant: trained" in n.message for n in app._notifications)
        titles = [c.title for c in app.get_system_commands(app.screen)]
        assert "Variant: trained" in titles
