"""`kyara report` and the Reports screen, on results.json files written here by the eval
contract (/tmp/k15/contract.md, pipelines/evaluation/results.py's output): 4 combinations,
3 criteria, some figures missing (None)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from console.cli import app as cli_app

VARIANTS = ("gemma3-270m", "ayane-270m")
CRITERIA = [
    {"name": "personality", "title": "Personality", "calibration": "calibrated ρ=0.71 (n=40)"},
    {"name": "style", "title": "Style", "calibration": "calibrated ρ=0.64 (n=40)"},
    {"name": "hallucination", "title": "Hallucination", "calibration": "uncalibrated"},
]


def P(k: int, n: int) -> dict | None:  # the contract's name
    """A Wilson-interval proportion as results.json holds it (null when n == 0)."""
    if n == 0:
        return None
    rate = k / n
    return {"rate": rate, "lo": max(0.0, rate - 0.1), "hi": min(1.0, rate + 0.1),
            "k": k, "n": n}


def stat(mean, lo, hi, n=40, missing=0, diff=None) -> dict:
    return {"mean": mean, "lo": lo, "hi": hi, "n": n, "missing": missing, "diff": diff}


def diff(mean, lo, hi, p, n=40) -> dict:
    return {"mean": mean, "lo": lo, "hi": hi, "p": p, "n": n}


def make_results(name: str = "ayane-eval", created: str = "2025-06-01T12:00:00+09:00") -> dict:
    """A realistic results.json: gemma3-270m (reference) and ayane-270m, RAG off and on."""
    combos = [{"id": v + ("+rag" if rag else ""), "variant": v, "rag": rag,
               "label": f"{v} · RAG {'on' if rag else 'off'}"}
              for v in VARIANTS for rag in (False, True)]
    ref = combos[0]["id"]
    style_ref = {"ends": P(30, 40), "register": P(20, 40), "one_sentence": P(35, 40),
                 "stop": P(38, 40), "newlines": P(40, 40), "median_chars": 41.0}
    headline = [
        {"combo": ref, "label": combos[0]["label"], "reference": True, "questions": 40,
         "criteria": {"personality": stat(4.5, 4.2, 4.81),
                      "style": stat(3.9, 3.6, 4.2),
                      "hallucination": stat(5.0, 4.7, 5.3, n=12)},
         "pairwise": {}, "style": style_ref, "facts": P(18, 30)},
        {"combo": combos[1]["id"], "label": combos[1]["label"], "reference": False,
         "questions": 40,
         "criteria": {"personality": stat(5.12, 4.8, 5.41, diff=diff(0.62, 0.21, 1.05, 0.004)),
                      "style": stat(4.05, 3.7, 4.3, diff=diff(0.15, -0.1, 0.4, 0.31)),
                      "hallucination": stat(5.2, 4.9, 5.5, n=12,
                                            diff=diff(0.2, -0.2, 0.6, 0.45, n=12))},
         "pairwise": {"personality": {"win": P(18, 40), "tie": P(8, 40), "loss": P(14, 40),
                                      "n": 40},
                      "style": {"win": P(10, 40), "tie": P(20, 40), "loss": P(10, 40),
                                "n": 40}},
         "style": {**style_ref, "ends": P(36, 40)}, "facts": P(27, 30)},
        {"combo": combos[2]["id"], "label": combos[2]["label"], "reference": False,
         "questions": 40,
         "criteria": {"personality": stat(6.1, 5.9, 6.3, diff=diff(1.6, 1.3, 1.9, 0.0001)),
                      "style": stat(None, None, None, n=0, missing=40,
                                    diff=diff(None, None, None, None, n=0)),
                      "hallucination": stat(6.0, 6.0, 6.0, n=1, missing=11,
                                            diff=diff(1.0, None, None, None, n=1))},
         "pairwise": {"personality": {"win": P(30, 40), "tie": P(5, 40), "loss": P(5, 40),
                                      "n": 40},
                      "style": {"win": None, "tie": None, "loss": None, "n": 0}},
         "style": {"ends": P(39, 40), "register": P(37, 40), "one_sentence": P(33, 40),
                   "stop": P(40, 40), "newlines": P(40, 40), "median_chars": 38.5},
         "facts": P(15, 30)},
        {"combo": combos[3]["id"], "label": combos[3]["label"], "reference": False,
         "questions": 38,
         "criteria": {"personality": stat(6.3, 6.05, 6.52, n=38, missing=2,
                                          diff=diff(1.8, 1.5, 2.1, 0.0002, n=38)),
                      "style": stat(5.5, 5.2, 5.8, n=38, missing=2,
                                    diff=diff(1.6, 1.2, 2.0, 0.0003, n=38)),
                      "hallucination": stat(3.2, 2.8, 3.6, n=12,
                                            diff=diff(-1.8, -2.3, -1.3, 0.002, n=12))},
         "pairwise": {"personality": {"win": P(32, 38), "tie": P(2, 38), "loss": P(4, 38),
                                      "n": 38}},
         "style": {"ends": P(0, 0), "register": P(0, 0), "one_sentence": P(0, 0),
                   "stop": P(0, 0), "newlines": P(0, 0), "median_chars": None},
         "facts": None},
    ]
    distributions = {c["id"]: {crit["name"]: {str(s): 0 for s in range(1, 8)}
                               for crit in CRITERIA} for c in combos}
    questions = [{"set": "heldout", "id": "q01", "question": "お兄様はどちらに？",
                  "transcript": None,
                  "replies": {c["id"]: {"text": "ボストンですわ。", "stop": "eos", "error": None,
                                        "scores": {"personality": 5}, "pairwise": {},
                                        "fact_hit": True} for c in combos},
                  "disagreement": 1.0}]
    return {"meta": {"name": name, "persona": "ayane",
                     "judge": {"name": "gpt-4o-mini", "model": "gpt-4o-mini"},
                     "created": created, "reference": ref, "seed": 0, "samples": 1,
                     "confidence": 0.95},
            "combos": combos, "criteria": CRITERIA, "sets": ["heldout", "probes", "scripts"],
            "headline": headline, "distributions": distributions, "questions": questions}


def write_run(home: Path, name: str, created: str, results: dict | str | None = None,
              reports: bool = True) -> Path:
    """<home>/evals/<name>/results.json (+ report.html, report.md) as the eval job leaves
    them; `results` a string writes it as it is (a corrupt file)."""
    folder = home / "evals" / name
    folder.mkdir(parents=True, exist_ok=True)
    data = make_results(name, created) if results is None else results
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, indent=2)
    (folder / "results.json").write_text(text, encoding="utf-8")
    if reports:
        (folder / "report.html").write_text("<html></html>", encoding="utf-8")
        (folder / "report.md").write_text("# report\n", encoding="utf-8")
    return folder


@pytest.fixture
def home(tmp_path) -> Path:
    return Path(os.environ["KYARA_HOME"])  # tests/conftest.py points it into tmp_path


@pytest.fixture
def runs(home) -> dict[str, Path]:
    """Three runs written out of date order, one of them corrupt."""
    return {"older": write_run(home, "older", "2025-05-01T09:00:00+09:00"),
            "newest": write_run(home, "newest", "2025-06-02T09:00:00+09:00"),
            "broken": write_run(home, "broken", "", results='{"meta": {"name": "broken", ')}


def invoke(*args: str):
    return CliRunner().invoke(cli_app, ["report", *args], env={"COLUMNS": "80"})


def lines_with(output: str, start: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith(start)]


# --- kyara report --------------------------------------------------------------------------


def test_report_prints_the_headline_table(runs):
    result = invoke("newest")
    assert result.exit_code == 0, result.output
    out = result.stdout
    # each criterion: mean [CI], Δ vs the reference [CI], its p, pairwise W/T/L
    assert "5.12 [4.80, 5.41]" in out and "+0.62 [+0.21, +1.05]" in out and "p=0.004" in out
    assert "W45% T20% L35%" in out and "W84% T5% L11%" in out
    assert "-1.80 [-2.30, -1.30]" in out and "p<0.001" in out
    # calibration under each criterion's title
    assert "calibrated ρ=0.71" in out and "uncalibrated" in out
    # the reference row is marked, in both tables
    assert "(reference)" in out and "(ref)" in out
    assert out.count("reference") >= 3  # its Δ cells say so instead of a number
    # style figures and facts as %
    row = lines_with(out, "gemma3-270m · RAG on")[-1].split()
    assert row[-7:] == ["90%", "50%", "88%", "95%", "100%", "41", "90%"] or \
        row[-8:-1] == ["90%", "50%", "88%", "95%", "100%", "41", "90%"]
    assert "27/30" in lines_with(out, "gemma3-270m · RAG on")[-1]
    # missing values are a dash: no style figures, no facts, no mean, no interval
    missing_row = lines_with(out, "ayane-270m · RAG on")[-1]
    assert missing_row.split()[-7:] == ["—"] * 7
    assert "+1.00 [—]" in out and "p=— 40 missing" in out and "W/T/L —" in out
    # then where the reports are
    folder = runs["newest"]
    assert f"report.html {folder / 'report.html'}" in " ".join(out.split())
    assert f"report.md {folder / 'report.md'}" in " ".join(out.split())
    assert all(len(line) <= 80 for line in out.splitlines() if "report." not in line)


def test_report_takes_a_folder_or_a_results_json(runs):
    by_name = invoke("newest").stdout
    assert invoke(str(runs["newest"])).stdout == by_name
    assert invoke(str(runs["newest"] / "results.json")).stdout == by_name


def test_report_lists_the_runs_newest_first(runs):
    old = 1_700_000_000  # the corrupt run has no date of its own: its file's, made oldest
    os.utime(runs["broken"] / "results.json", (old, old))
    result = invoke()
    assert result.exit_code == 0
    names = [line.split()[0] for line in result.stdout.splitlines()[1:] if line.strip()]
    assert [n for n in names if n in runs] == ["newest", "older", "broken"]
    newest = lines_with(result.stdout, "newest")[0]
    assert re.search(r"2025-06-0[12] \d\d:\d\d\s+4\s", newest)
    folded = "".join(line.split()[-1] for line in result.stdout.splitlines()[1:])
    assert str(runs["newest"]) in folded  # a long path folds, whole
    assert "corrupt" in lines_with(result.stdout, "broken")[0]
    assert "not valid JSON" in result.stderr and len(result.stderr.splitlines()) == 1


def test_no_runs_yet(home):
    result = invoke()
    assert result.exit_code == 0 and "no eval runs under" in result.stdout


def test_a_missing_run_is_one_line_and_exit_2(runs):
    result = invoke("nope")
    assert result.exit_code == 2
    assert result.stdout == "" and len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith("kyara: no eval run 'nope'")
    result = invoke(str(runs["older"].parent / "gone" / "results.json"))
    assert result.exit_code == 2 and len(result.stderr.splitlines()) == 1


def test_a_corrupt_results_json_is_one_line_and_exit_2(runs, home):
    result = invoke("broken")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert len(result.stderr.splitlines()) == 1 and "not valid JSON" in result.stderr
    # valid JSON, wrong figures: named, one line, no traceback
    bad = make_results("bad")
    bad["headline"][1]["criteria"]["personality"]["mean"] = "high"
    write_run(home, "bad", "", results=bad)
    result = invoke("bad")
    assert result.exit_code == 2 and len(result.stderr.splitlines()) == 1
    assert "headline[1].criteria.personality.mean" in result.stderr
    write_run(home, "list", "", results="[1, 2]")
    result = invoke("list")
    assert result.exit_code == 2 and "not an eval results file" in result.stderr


def test_the_real_command_fails_in_one_line(runs):
    from tests.conftest import run_kyara

    done = run_kyara("report", "broken")
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert "not valid JSON" in done.stderr and "Traceback" not in done.stderr


# --- the chart -------------------------------------------------------------------------------


def test_a_bar_reaches_the_mean_and_the_whisker_spans_the_interval(tmp_path):
    from console.report_cli import build_report
    from console.reports_screen import CriterionChart

    report = build_report(make_results(), tmp_path / "results.json")
    chart = CriterionChart(report, report.criteria[0])
    cell = report.rows[0].cells["personality"]
    cell.mean, cell.lo, cell.hi = 4.0, 3.0, 5.5  # on 1..7 over 61 cells: 10 a point
    assert chart.bar(cell, 61, False).plain == "█" * 20 + "├" + "─" * 9 + "┼" + "─" * 14 + "┤"
    cell.lo = cell.hi = None
    assert chart.bar(cell, 61, False).plain == "█" * 31
    cell.mean = None
    assert chart.bar(cell, 61, False).plain == "missing"
    assert chart.axis(61).plain == "1" + " " * 9 + "2" + " " * 9 + "3" + " " * 9 + "4" \
        + " " * 9 + "5" + " " * 9 + "6" + " " * 9 + "7"


# --- the Reports screen ----------------------------------------------------------------------


def console_app(tmp_path):
    from console.app import KyaraApp
    from pipelines.chat import ChatSession
    from pipelines.workspace import Workspace
    from store import Store
    from tests.conftest import CONFIGS
    from tests.console.test_chat_app import ScriptedBackend

    ws = Workspace.load(CONFIGS)  # its home is KYARA_HOME: this test's
    session = ChatSession(store=Store.open(tmp_path / "store"), persona=ws.persona("ayane"),
                          variant=ws.variant("gemma3-270m"), backend=ScriptedBackend())
    return KyaraApp(session, variants={}, backend_loader=None, workspace=ws,
                    export_dir=tmp_path)


def screen_text(app) -> str:
    """What the terminal shows now, as text."""
    return "\n".join(strip.text.rstrip() for strip in app.screen._compositor.render_strips())


async def settle(pilot) -> None:
    """The screen's thread workers done and their messages handled."""
    await pilot.pause()
    await pilot.app.workers.wait_for_complete()
    await pilot.pause()


async def until(pilot, predicate, what: str, steps: int = 200) -> None:
    for _ in range(steps):
        if predicate():
            return
        await pilot.pause()
    raise AssertionError(f"never: {what}\n{screen_text(pilot.app)}")


async def open_from_palette(pilot) -> None:
    from textual.command import CommandPalette

    app = pilot.app
    await pilot.press("ctrl+p")
    await until(pilot, lambda: isinstance(app.screen, CommandPalette), "the palette opens")
    await pilot.press(*"Reports")
    await until(pilot, lambda: "Reports" in screen_text(app)
                and app.screen.query_one("CommandList").highlighted is not None,
                "the palette offers Reports")
    await pilot.press("enter")


@pytest.fixture
def dated_runs(runs):
    old = 1_700_000_000  # 2023: the corrupt run (its date is its file's) is the oldest
    os.utime(runs["broken"] / "results.json", (old, old))
    return runs


async def test_reports_from_the_palette_list_and_open_a_run(dated_runs, tmp_path):
    from console.reports_screen import ReportScreen, ReportsScreen

    app = console_app(tmp_path)
    async with app.run_test(size=(80, 24)) as pilot:
        await open_from_palette(pilot)
        await until(pilot, lambda: isinstance(app.screen, ReportsScreen), "Reports opens")
        screen = app.screen
        await settle(pilot)
        assert [run.name for run in screen.runs] == ["newest", "older", "broken"]
        text = screen_text(app)
        assert "3 eval runs, newest first" in text
        assert text.index("newest") < text.index("older") < text.index("broken")
        assert "corrupt results.json" in text
        await pilot.press("enter")  # the newest
        await until(pilot, lambda: isinstance(app.screen, ReportScreen), "the run opens")
        report_screen = app.screen
        await settle(pilot)
        assert report_screen.report is not None and report_screen.report.name == "newest"
        text = screen_text(app)
        assert "report.html" in text and "reference gemma3-270m · RAG off" in text
        assert "".join(text.split()).count(str(dated_runs["newest"] / "report.html")) == 1
        # the headline table on the first page: the reference marked, then a combination
        assert "(reference)" in text and "4.50 [4.20, 4.81]" in text
        assert "5.12 [4.80, 5.41]" in text and "+0.62 [+0.21, +1.05]" in text, text
        assert "p=0.004" in text and "W45% T20% L35%" in text
        await pilot.press("c")  # the first criterion's chart
        await pilot.pause()
        text = screen_text(app)
        assert "Personality" in text and "├" in text and "┤" in text and "█" in text, text
        assert "5.12 [4.80, 5.41]  Δ +0.62 p=0.004" in text
        await pilot.press("c")  # Style: ayane-270m · RAG off has no score
        await pilot.pause()
        assert "missing" in screen_text(app)
        assert all(len(line) <= 80 for line in screen_text(app).splitlines())
        await pilot.press("escape")
        assert app.screen is screen
        await pilot.press("escape")
        assert app.screen is app.screen_stack[0]


async def test_reports_from_the_jobs_screen_key(dated_runs, tmp_path):
    from console.jobs_screen import JobsScreen
    from console.reports_screen import ReportsScreen

    app = console_app(tmp_path)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("ctrl+j")
        await until(pilot, lambda: isinstance(app.screen, JobsScreen), "the jobs screen")
        jobs = app.screen
        assert "r" in jobs.active_bindings and jobs.active_bindings["r"].binding.id == \
            "jobs_reports"
        await until(pilot, lambda: "Reports" in screen_text(app).splitlines()[-1],
                    "the footer shows the key")
        await pilot.press("r")
        await until(pilot, lambda: isinstance(app.screen, ReportsScreen), "Reports opens")
        await settle(pilot)
        assert [run.name for run in app.screen.runs] == ["newest", "older", "broken"]
        await pilot.press("escape")
        assert app.screen is jobs


async def test_a_corrupt_results_json_is_one_line_in_the_screen(dated_runs, tmp_path):
    from console.reports_screen import ReportScreen, ReportsScreen

    app = console_app(tmp_path)
    async with app.run_test(size=(80, 24)) as pilot:
        app.action_reports()
        await until(pilot, lambda: isinstance(app.screen, ReportsScreen), "Reports opens")
        await settle(pilot)
        await pilot.press("end", "enter")  # the corrupt run, the oldest
        await until(pilot, lambda: isinstance(app.screen, ReportScreen), "the run opens")
        screen = app.screen
        await settle(pilot)
        assert screen.error is not None and "\n" not in screen.error
        assert "not valid JSON" in screen.error and screen.report is None
        assert "not valid JSON" in screen_text(app)
        await pilot.press("escape")
        assert isinstance(app.screen, ReportsScreen) and app.is_running


async def test_no_eval_runs_yet_says_how_to_make_one(home, tmp_path):
    from console.reports_screen import ReportsScreen

    app = console_app(tmp_path)
    async with app.run_test(size=(80, 24)) as pilot:
        app.action_reports()
        await until(pilot, lambda: isinstance(app.screen, ReportsScreen), "Reports opens")
        await settle(pilot)
        assert app.screen.runs == [] and "no eval runs under" in screen_text(app)


async def test_the_arena_from_the_reports_screen(dated_runs, tmp_path):
    """`a` on the Reports screen: the human votes' Bradley–Terry table (the blind A/B's
    votes in the app's store), the judge's arena empty, `r` refits after a new vote."""
    from console.arena_screen import ArenaScreen
    from console.reports_screen import ReportsScreen
    from pipelines import feedback as fb

    app = console_app(tmp_path)
    store = app.session.store

    def vote(chosen, rejected, n):
        for _ in range(n):
            fb.record_preference(store, prompt=[{"role": "user", "content": "q"}],
                                 chosen="a", rejected="b", tie=False, source="human",
                                 variants={"chosen": chosen, "rejected": rejected})

    vote("ayane-270m", "gemma3-270m", 8)
    vote("gemma3-270m", "ayane-270m", 2)
    async with app.run_test(size=(80, 24)) as pilot:
        await open_from_palette(pilot)
        await until(pilot, lambda: isinstance(app.screen, ReportsScreen), "Reports opens")
        reports = app.screen
        await settle(pilot)
        assert "Arena" in screen_text(app).splitlines()[-1]  # the footer shows the key
        await pilot.press("a")
        await until(pilot, lambda: isinstance(app.screen, ArenaScreen), "the arena opens")
        await settle(pilot)
        text = screen_text(app)
        assert "human votes · 10 games" in text, text
        rows = [line for line in text.splitlines() if "270m" in line]
        assert "ayane-270m" in rows[0] and "8/0/2" in rows[0], rows  # ranked first
        assert "gemma3-270m" in rows[1] and "2/0/8" in rows[1], rows
        assert "arena · judge: no games yet" in text
        assert "agreement: needs 2 variants rated by both, found 0" in text
        assert all(len(line) <= 80 for line in text.splitlines())
        vote("gemma3-270m", "ayane-270m", 1)
        await pilot.press("r")
        await settle(pilot)
        assert "human votes · 11 games" in screen_text(app)
        await pilot.press("escape")
        assert app.screen is reports
