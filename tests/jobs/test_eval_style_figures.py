"""The style figures an eval run reports (results.json's headline `style`) are
`pipelines.evaluation.figures`' on the same replies, name for name: one count, one meaning
per name (`newlines`: the share of replies without a line break)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipelines.evaluation import Reply, figures
from pipelines.style import reply_style
from pipelines.workspace import Workspace
from tests.jobs.test_eval_job import env, job_file, run_job, server  # noqa: F401 (fixtures)


def test_the_eval_jobs_style_figures_are_figures_name_for_name(env, server):  # noqa: F811
    events, _ = run_job(env, job_file(env))
    assert events[-1].type == "done", events[-1]
    out = Path(events[-1].summary["output"])
    replies = [json.loads(line) for line in
               (out / "replies.jsonl").read_text(encoding="utf-8").split("\n") if line]
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    rules = Workspace.load(env["configs"]).persona("ayane").speech
    seen = set()
    for row in results["headline"]:
        mine = [r for r in replies if r["combo"] == row["combo"] and not r.get("error")]
        # every stored style record is the per-reply record of its text and stop
        for r in mine:
            assert r["style"] == reply_style(r["text"], rules, r["stop"]).record()
        figs = figures(row["combo"], [Reply(r["question"], r["text"], r["stop"], r["tokens"])
                                      for r in mine], rules)
        style = row["style"]
        assert set(style) - {"median_chars"} <= set(figs.rates), (style, figs.rates)
        for name, stat in style.items():
            if name == "median_chars":
                assert stat == figs.median_chars
                continue
            assert stat["rate"] == pytest.approx(figs.rates[name]), name
            assert [stat["k"], stat["n"]] == figs.counts[name], name
            seen.add((name, stat["rate"]))
        assert style["newlines"]["rate"] == pytest.approx(1 - figs.line_breaks)
    # the stand-ins make the figures differ between the variants (not all 0 or all 1)
    assert {rate for name, rate in seen if name == "ends"} == {0.0, 1.0}
