"""The final score and the probability-weighted score (G-Eval)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines.judge.parse import (
    TokenLogprob,
    decision_offset,
    digit_of,
    parse_score,
    reasoning_of,
    weighted_score,
)

LAB_2 = """1. プロフィールを読み、キャラクターの性格や好みを記述します。
- お嬢様であることから、少し高貴で品のある性格を持っていると予想されます。
4. 評価スケールに従って、キャラクターの性格や好みをどれだけ反映しているかを評価します。
- 1から7のスケールで、あまりキャラクターの性格や好みを反映していないため、評価は「2」とします。"""

LAB_7 = """3. ****比較と評価****:
- AI アシスタントの回答はキャラクターのプロフィールにしっかりと一致しています。
4. ****評価のスケール****:
- このように、AI アシスタントはキャラクターの性格や好みを適切に反映しているため、評価スケールでは高い点数を与えるべきです。7点が適当だと考えます。"""


@pytest.mark.parametrize("text, score", [
    ("理由。\n7", 7),
    ("理由。\n6\n6", 6),
    ("理由。\n７", 7),
    ("理由。\n7点", 7),
    ("理由。\nスコア: 7", 7),
    ("理由。\nスコア：５", 5),
    ("理由。\n評価：7", 7),
    ("理由。\n評価: 3点", 3),
    ("理由。\n7/7", 7),
    ("理由。\n4 / 7", 4),
    ("理由。\n**7**", 7),
    ("理由。\nScore: **2**", 2),
    ("理由。\n**スコア: 6**", 6),
    ("理由。\n## 最終スコア: 3", 3),
    ("理由。\n【評価】4", 4),
    ("理由。\n- 5", 5),
    ("理由。\n5\n\n", 5),
    ("理由。\r\n4\r\n", 4),
    ("理由。\n　６　", 6),
    ("Score: 7 と書かれているが\n2\n2", 2),     # the last standalone score wins
    ("3\n理由。\n5\n以上です。", 5),            # a closing remark after the score line
    (LAB_2, 2),                                # the lab's answers, which ignored the format
    (LAB_7, 7),
])
def test_final_score_forms(text, score):
    parsed = parse_score(text)
    assert parsed is not None and parsed.score == score


@pytest.mark.parametrize("text", [
    "", "理由だけで点数がない。", "理由。\n8", "理由。\n0", "理由。\n10", "理由。\n6.5",
    "理由。\n-3", "理由。\n5/10", "理由。\n10/10", "理由。\n07", "理由。\n5\n8",
    "1から7のスケールで評価します。", "スコアは8です。", "評価は10点です。",
])
def test_no_valid_final_score_is_none(text):
    assert parse_score(text) is None


def test_offset_points_at_the_digit_in_the_raw_text():
    text = "理由です。\nスコア：７点\n７"
    parsed = parse_score(text)
    assert text[parsed.offset] == "７" and parsed.offset == len(text) - 1
    assert reasoning_of(text, parsed) == "理由です。"


def test_reasoning_drops_the_repeated_score_lines():
    text = "ステップ1\nステップ2\n\n6\n6"
    assert reasoning_of(text, parse_score(text)) == "ステップ1\nステップ2"


# --- properties ------------------------------------------------------------------------

SCORE_LINES = st.sampled_from([
    "{n}", "{w}", "{n}点", "スコア: {n}", "スコア：{w}", "評価：{n}", "{n}/7", "**{n}**",
    "Score: {n}", "score:{n}", "**スコア: {n}**", "- {n}", "採点結果: {n}", "評価: {w}点",
])
FULL = "０１２３４５６７８９"


@settings(max_examples=300, deadline=None)
@given(reasoning=st.text(max_size=300), template=SCORE_LINES, n=st.integers(1, 7))
def test_any_reasoning_then_a_score_line_parses_to_that_score(reasoning, template, n):
    line = template.format(n=n, w=FULL[n])
    parsed = parse_score(f"{reasoning}\n{line}")
    assert parsed is not None and parsed.score == n


@settings(max_examples=300, deadline=None)
@given(reasoning=st.text(max_size=200), template=SCORE_LINES,
       n=st.one_of(st.integers(-50, 0), st.integers(8, 10_000)))
def test_a_final_number_out_of_range_never_parses(reasoning, template, n):
    line = template.replace("{w}", "{n}").format(n=n)
    assert parse_score(f"{reasoning}\n{line}") is None


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=500))
def test_the_parser_never_raises_and_only_returns_1_to_7(text):
    parsed = parse_score(text)
    assert parsed is None or parsed.score in range(1, 8)
    if parsed is not None:
        assert digit_of(text[parsed.offset]) == parsed.score
        reasoning_of(text, parsed)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Nd", "No")), max_size=300))
def test_text_without_digits_never_parses(text):
    assert parse_score(text) is None


# --- G-Eval ----------------------------------------------------------------------------


def tokens_of(text: str, top: dict[str, float], at: int = -1) -> list[TokenLogprob]:
    """One token per character, certain everywhere but at the `at`-th digit of the text
    (default the last), which gets the alternatives `top`."""
    tokens = [TokenLogprob(ch, -0.01, ((ch, -0.01),)) for ch in text]
    digits = [i for i, t in enumerate(tokens) if digit_of(t.token) is not None]
    where = digits[at]
    tokens[where] = TokenLogprob(tokens[where].token, top.get(tokens[where].token, -5),
                                 tuple(top.items()) + (("。", -3.0),))
    return tokens


def test_weighted_score_is_the_expectation_over_1_to_7():
    text = "理由。\n6\n6"
    top = {"6": math.log(0.6), "7": math.log(0.3), "5": math.log(0.1)}
    weighted = weighted_score(text, parse_score(text), tokens_of(text, top, at=0))
    assert weighted == pytest.approx(0.6 * 6 + 0.3 * 7 + 0.1 * 5)


def test_weighted_score_is_read_at_the_score_line_not_at_its_repeat():
    # gpt-4o-mini's shape: 5 and 6 equally likely where it decides, the repeat a copy (p~1)
    text = "口調は丁寧で、お嬢様らしい。\nスコア: 5\n\n5"
    certain_repeat = tokens_of(text, {"5": math.log(0.5), "6": math.log(0.5)}, at=0)
    parsed = parse_score(text)
    assert parsed.score == 5 and text[parsed.offset] == "5" and parsed.offset == len(text) - 1
    assert decision_offset(text, parsed) == text.index("5")
    assert weighted_score(text, parsed, certain_repeat) == pytest.approx(5.5)
    # what the old reading gave: the repeat's certain digit
    at_repeat = tokens_of(text, {"5": math.log(0.999), "6": math.log(0.001)}, at=-1)
    assert weighted_score(text, parsed, at_repeat) == pytest.approx(5.0)


def test_three_trailing_score_lines_weight_the_first():
    text = "理由。\n**4**\n4\n4"
    tokens = tokens_of(text, {"4": math.log(0.4), "3": math.log(0.6)}, at=0)
    assert weighted_score(text, parse_score(text), tokens) == pytest.approx(3.4)


def test_a_changed_mind_weights_the_lines_that_agree_with_the_score_kept():
    text = "理由。\n5\n6"  # the judge printed 5, then "repeated" 6: the score is 6
    parsed = parse_score(text)
    assert parsed.score == 6 and decision_offset(text, parsed) == parsed.offset
    tokens = tokens_of(text, {"6": math.log(0.7), "7": math.log(0.3)}, at=-1)
    assert weighted_score(text, parsed, tokens) == pytest.approx(6.3)


def test_a_score_in_a_sentence_is_weighted_where_it_stands():
    text = "理由を述べました。\n評価は「4」とします。"
    parsed = parse_score(text)
    assert parsed.form == "sentence" and decision_offset(text, parsed) == parsed.offset
    tokens = tokens_of(text, {"4": math.log(0.5), "5": math.log(0.5)})
    assert weighted_score(text, parsed, tokens) == pytest.approx(4.5)


def test_misaligned_tokens_fall_back_to_the_first_of_the_trailing_score_tokens():
    # a server that rewrote the text: positions do not line up, the token run still does
    text = "理由。\n5\n5"
    tokens = [TokenLogprob("ちがう文章です。", -0.1), TokenLogprob("\n", -0.01),
              TokenLogprob("5", math.log(0.5), (("5", math.log(0.5)), ("6", math.log(0.5)))),
              TokenLogprob("\n", -0.01), TokenLogprob("5", -0.001, (("5", -0.001),))]
    assert weighted_score(text, parse_score(text), tokens) == pytest.approx(5.5)


def test_weighted_score_renormalises_over_the_score_tokens_only():
    text = "理由。\n7"
    top = {"7": math.log(0.5), "6": math.log(0.25)}  # the rest is "。" and others
    weighted = weighted_score(text, parse_score(text), tokens_of(text, top))
    assert weighted == pytest.approx((0.5 * 7 + 0.25 * 6) / 0.75)


def test_full_width_and_spaced_tokens_count_as_their_digit():
    text = "理由。\n７"
    top = {"７": math.log(0.5), " 6": math.log(0.3), "5": math.log(0.2)}
    weighted = weighted_score(text, parse_score(text), tokens_of(text, top))
    assert weighted == pytest.approx(0.5 * 7 + 0.3 * 6 + 0.2 * 5)


def test_the_position_is_found_through_byte_split_tokens():
    text = "絢音は明るい。\n5"
    tokens = []
    for ch in text[:-1]:  # every Japanese character split in two byte pieces
        raw = ch.encode()
        pieces = [raw[:1], raw[1:]] if len(raw) > 1 else [raw]
        tokens += [TokenLogprob("bytes:" + p.hex(), -0.1, (), p) for p in pieces]
    tokens.append(TokenLogprob("5", math.log(0.5), (("5", math.log(0.5)), ("4", math.log(0.5))),
                               b"5"))
    assert weighted_score(text, parse_score(text), tokens) == pytest.approx(4.5)


def test_no_logprobs_or_no_digit_alternatives_gives_none():
    text = "理由。\n5"
    assert weighted_score(text, parse_score(text), None) is None
    assert weighted_score(text, parse_score(text), [TokenLogprob("理由。\n", 0.0)]) is None
