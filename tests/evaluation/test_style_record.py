"""The one per-reply style record (pipelines.style.ReplyStyle): its flags are check_reply's
verdicts under the names reports show, it round-trips through a stored record, and stored
records (older ones lacking a flag too) count as the replies themselves do."""

from __future__ import annotations

import pytest

from pipelines.evaluation import Reply, figures
from pipelines.evaluation.figures import style_figures
from pipelines.evaluation.results import _style
from pipelines.style import FLAGS, ReplyStyle, check_reply, reply_style, style_score
from pipelines.workspace import Workspace
from tests.conftest import CONFIGS

REPLIES = [("わたくし、紅茶が大好きですわ。", "eos"), ("そうですわね\nまた明日。", "eos"),
           ("ミュージカルが大好きですわ", "length"), ("紅茶が好きです。お茶も。", "eos")]


@pytest.fixture(scope="module")
def rules():
    return Workspace.load(CONFIGS).persona("ayane").speech


def test_the_record_is_the_badges_checks_by_report_name(rules):
    for text, stop in REPLIES:
        checks = check_reply(text, rules, stop)
        style = reply_style(text, rules, stop)
        assert list(style.checks) == checks
        ok = {c.name: c.ok for c in checks}
        assert {name: style.flag(name) for name in FLAGS} == {
            name: ok[check] for name, check in FLAGS.items()}
        assert style.newlines == ("\n" not in text.strip())  # True: no line break
        assert style.score == pytest.approx(style_score(checks))
        assert style.chars == len(text.strip())
        assert ReplyStyle.from_record(style.record()) == style


def test_stored_records_count_as_the_replies_do(rules):
    replies = [Reply("q", text, stop, 3) for text, stop in REPLIES]
    figs = figures("x", replies, rules)
    stored = style_figures("x", [ReplyStyle.from_record(reply_style(r.text, rules, r.stop)
                                                        .record()) for r in replies])
    for name in ("n", "ends_maru", "ojousama", "stop_eos", "line_breaks", "style",
                 "median_chars", "checks", "rates", "counts"):
        assert getattr(stored, name) == getattr(figs, name), name
    assert figs.line_breaks == 0.25 and figs.rates["newlines"] == 0.75


def test_an_older_record_without_length_still_reads(rules):
    old = {"ends": True, "register": True, "one_sentence": True, "stop": True,
           "newlines": True, "chars": 10}  # written before `length` was stored
    shown = _style([{"style": old}, {"style": [{**old, "newlines": False, "chars": 20}]}],
                   0.95)
    assert shown["newlines"]["rate"] == 0.5 and shown["newlines"]["n"] == 2
    assert shown["median_chars"] == 15.0
    assert _style([], 0.95) == {"ends": None, "register": None, "one_sentence": None,
                                "stop": None, "newlines": None, "median_chars": None}
