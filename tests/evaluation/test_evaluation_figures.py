"""The figures the train job stores and the badges the console shows come from the same
check: for every reply, each rate counts exactly the replies whose `check_reply` verdict
(the console's badge) passes, with the persona's own speech rules."""

from __future__ import annotations

import pytest

from pipelines.config import SpeechRules
from pipelines.evaluation import Figures, Reply, figures, table
from pipelines.style import check_reply, style_score
from pipelines.workspace import Workspace
from tests.conftest import CONFIGS

# (reply, stop reason): in the persona's endings or not, with line breaks, without 。,
# too long, two sentences, cut off by length, empty.
REPLIES = [
    ("わたくし、紅茶が大好きですわ。", "eos"),
    ("レオとお散歩するのが楽しみですの。", "eos"),
    ("明日もお稽古があるのかしら。", "eos"),
    ("紅茶が好きです。", "eos"),
    ("そうですわね\nまた明日お会いしましょう。", "eos"),
    ("ミュージカルが大好きですわ", "length"),
    ("わたくしは歌が好きですわ。毎晩練習しておりますの。", "eos"),
    ("いいわ。", "eos"),  # the old お嬢様 regex counted "わ。"; the persona's endings do not
    ("本日は学園祭の準備で朝から晩までずっと忙しくしておりまして、紅茶を飲む時間もございませんでしたの。", "eos"),
    ("  ", "length"),
]


@pytest.fixture(scope="module")
def rules() -> SpeechRules:
    return Workspace.load(CONFIGS).persona("ayane").speech


def badges(text: str, rules: SpeechRules, stop: str) -> dict[str, bool]:
    """What the console's badges say under a reply (console/app.py on_reply_done)."""
    return {c.name: c.ok for c in check_reply(text, rules, stop)}


def test_figures_agree_with_the_badges_reply_by_reply(rules):
    replies = [Reply(f"q{i}", text, stop, 1) for i, (text, stop) in enumerate(REPLIES)]
    shown = [badges(text, rules, stop) for text, stop in REPLIES]
    figs = figures("ayane", replies, rules)
    n = len(REPLIES)

    def share(name: str) -> float:
        return sum(b[name] for b in shown) / n

    assert figs.n == n
    assert set(figs.checks) == {"length", "ends", "newlines", "sentences", "register", "stop"}
    for name, value in figs.checks.items():
        assert value == pytest.approx(share(name)), name
    assert figs.ends_maru == pytest.approx(share("ends"))
    assert figs.ojousama == pytest.approx(share("register"))
    assert figs.stop_eos == pytest.approx(share("stop"))
    assert figs.line_breaks == pytest.approx(1 - share("newlines"))  # with a line break
    assert figs.rates["newlines"] == pytest.approx(share("newlines"))  # without one
    assert figs.style == pytest.approx(
        sum(style_score(check_reply(t, rules, s)) for t, s in REPLIES) / n)
    # every kind of reply is in the set: no rate is trivially 0 or 1
    assert all(0 < value < 1 for value in figs.checks.values()), figs.checks
    # and one reply at a time, each figure is that reply's badge
    for (text, stop), badge in zip(REPLIES, shown, strict=True):
        one = figures("ayane", [Reply("q", text, stop, 1)], rules)
        assert one.checks == {name: float(ok) for name, ok in badge.items()}
        assert one.ojousama == float(badge["register"])
        assert one.ends_maru == float(badge["ends"])


def test_the_register_rate_reads_the_personas_endings(rules):
    other = rules.model_copy(update={"endings": ["だぜ"]})
    replies = [Reply("q", "最高だぜ。", "eos", 3), Reply("q", "素敵ですわ。", "eos", 3)]
    assert figures("x", replies, other).ojousama == 0.5
    assert figures("x", replies, other).checks["register"] == 0.5
    assert figures("x", replies[1:], rules).ojousama == 1.0
    assert figures("x", [Reply("q", "いいわ。", "eos", 2)], rules).ojousama == 0.0


def test_no_replies_give_zero_rates(rules):
    figs = figures("x", [], rules)
    assert (figs.n, figs.ends_maru, figs.ojousama, figs.style, figs.median_chars) == (0, 0, 0, 0, 0)


def test_table_puts_two_sides_side_by_side_with_targets():
    def side(name: str, value: float, judge: float | None = None) -> Figures:
        return Figures(name, 4, value, value, 20.0, value, 0.0, value, judge=judge)

    before, after = side("base", 0.25), side("trained", 1.0, judge=5.5)
    after.notes.append("judge answered 4 of 4")
    text = table(before, after, {"ends_maru": "≥ 80%"})
    lines = text.splitlines()
    assert lines[0].split() == ["base", "trained", "target"]
    assert lines[1].split()[-4:] == ["25%", "100%", "≥", "80%"]
    assert any(line.startswith("persona endings") for line in lines)
    assert any(line.startswith("judge (personality, 1-7)") and "n/a" in line
               and "5.50" in line for line in lines)
    assert lines[-1] == "note: judge answered 4 of 4"
    assert "judge" not in table(side("a", 0.5), side("b", 0.5))
