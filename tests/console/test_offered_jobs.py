"""The console offers only job kinds that run: a file of a kind not implemented yet is in
neither the command palette nor the jobs screen's picker, and is named in a notification."""

from __future__ import annotations

from textual.widgets import OptionList

from tests.console.test_jobs_screen import app_for, ws_with_variant  # noqa: F401
from tests.jobs.conftest import configs, workspace  # noqa: F401


async def test_palette_and_picker_leave_out_a_kind_not_implemented(
        ws_with_variant, configs, tmp_path, monkeypatch):  # noqa: F811
    from pipelines import jobs

    monkeypatch.delitem(jobs.JOBS, "eval")  # every kind runs today: stands for the next one
    (configs / "jobs" / "eval-x.yaml").write_text("job: eval\nname: eval-x\nvariants: [m]\n",
                                                  encoding="utf-8")
    app = app_for(ws_with_variant, tmp_path)
    async with app.run_test(size=(80, 24)) as pilot:
        titles = [c.title for c in app.get_system_commands(app.screen)]
        assert "Run job: index-tiny" in titles and "Run job: eval-x" not in titles
        await pilot.press("ctrl+j")
        await pilot.pause()
        await pilot.press("n")
        await pilot.pause()
        picker = app.screen.query_one("#job-picker", OptionList)
        offered = [picker.get_option_at_index(i).id for i in range(picker.option_count)]
        assert offered == ["index-tiny"]
        assert any("eval-x.yaml: job kind 'eval' is not implemented yet" in n.message
                   for n in app._notifications)
