"""results.json from a small, fixed eval run, checked against numbers worked out by hand:
two combinations (the reference `base` and `tuned`), four held-out questions, one probe and
one script, with a failed verdict, an invalid one and a broken reply among them. A failed
verdict or a broken reply is missing, never a score."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from statistics import NormalDist

import pytest

from pipelines.evaluation import build_results, load_results, write_results

Z95 = NormalDist().inv_cdf(0.975)

META = {"name": "t", "persona": "ayane", "judge": {"name": "j", "model": "m"},
        "created": "2025-01-01T00:00:00+00:00", "reference": "base", "seed": 0, "samples": 1}
COMBOS = [
    {"id": "base", "variant": "base", "rag": False, "label": "base · RAG off"},
    {"id": "tuned", "variant": "tuned", "rag": False, "label": "tuned · RAG off"},
]
CRITERIA = [
    {"name": "personality", "title": "Personality", "calibration": "uncalibrated"},
    {"name": "hallucination", "title": "Hallucination", "calibration": "calibrated ρ=0.71 (n=40)"},
    {"name": "stability", "title": "Stability", "calibration": "uncalibrated"},
]
QUESTIONS = {"q1": "紅茶はお好き？", "q2": "あなたの名前はなんですか？", "q3": "犬は好き？",
             "q4": "誕生日はいつ？", "p1": "明日の株価は？", "s01": "では、また明日。"}
SCRIPT = [("user", "こんにちは。"), ("assistant", "ごきげんよう。"), ("user", "お元気？"),
          ("assistant", "ええ、元気ですわ。"), ("user", "では、また明日。")]


def reply(combo: str, kind: str, qid: str, *, chars: int, ends: bool, sample: int = 0,
          error: str | None = None, fact_hit: bool | None = None) -> dict:
    transcript = [{"role": r, "content": c} for r, c in SCRIPT] if kind == "scripts" else \
        [{"role": "user", "content": QUESTIONS[qid]}]
    text = "ご" * chars
    transcript.append({"role": "assistant", "content": text})
    return {"id": f"{combo}/{kind}/{qid}/{sample}", "combo": combo, "variant": combo,
            "rag": False, "set": kind, "question_id": qid, "sample": sample,
            "question": QUESTIONS[qid], "transcript": transcript, "text": text,
            "stop": "error" if error else "eos", "error": error, "tokens": chars,
            "tokens_per_s": 10.0, "seconds": 1.0, "rendered_prompt": "…",
            "retrieved_ids": None, "knowledge_ids": [], "expect": ["5月"] if qid == "q4" else [],
            "style": {"ends": ends, "register": True, "one_sentence": True, "stop": not error,
                      "newlines": True, "chars": chars},
            "fact_hit": fact_hit}


def score(combo: str, kind: str, qid: str, criterion: str, value: int | None, *,
          status: str = "ok", sample: int = 0) -> dict:
    return {"kind": "score", "reply_id": f"{combo}/{kind}/{qid}/{sample}", "combo": combo,
            "set": kind, "question_id": qid, "sample": sample, "criterion": criterion,
            "status": status, "score": value, "reasoning": "…" if status == "ok" else None,
            "error": None if status == "ok" else "timeout"}


def pair(combo: str, kind: str, qid: str, criterion: str, outcome: str | None,
         sample: int = 0) -> dict:
    return {"kind": "pairwise", "combo": combo, "reference": "base", "set": kind,
            "question_id": qid, "sample": sample, "criterion": criterion,
            "first": None if outcome is None else "A", "second": None if outcome is None else "B",
            "outcome": outcome}


REPLIES = [
    # base: every reply whole. ends: F F T F T F -> 2 of 6; chars 5 9 7 30 12 20 -> median
    # of (5 7 9 12 20 30) = (9 + 12) / 2 = 10.5
    reply("base", "heldout", "q1", chars=5, ends=False),
    reply("base", "heldout", "q2", chars=9, ends=False),
    reply("base", "heldout", "q3", chars=7, ends=True),
    reply("base", "heldout", "q4", chars=30, ends=False, fact_hit=False),
    reply("base", "probes", "p1", chars=12, ends=True),
    reply("base", "scripts", "s01", chars=20, ends=False),
    # tuned: p1 broke (its style must not count). ends over the 5 whole replies: T T F T T
    # -> 4 of 5; chars 10 20 30 41 16 -> median 20
    reply("tuned", "heldout", "q1", chars=10, ends=True),
    reply("tuned", "heldout", "q2", chars=20, ends=True),
    reply("tuned", "heldout", "q3", chars=30, ends=False),
    reply("tuned", "heldout", "q4", chars=41, ends=True, fact_hit=True),
    reply("tuned", "probes", "p1", chars=1000, ends=False, error="CUDA out of memory"),
    reply("tuned", "scripts", "s01", chars=16, ends=True),
]

VERDICTS = [
    # personality on the held-out questions and the probe
    score("base", "heldout", "q1", "personality", 4),
    score("base", "heldout", "q2", "personality", 5),
    score("base", "heldout", "q3", "personality", 3),
    score("base", "heldout", "q4", "personality", 6),
    score("base", "probes", "p1", "personality", 4),
    score("tuned", "heldout", "q1", "personality", 6),
    score("tuned", "heldout", "q2", "personality", None, status="failed"),
    score("tuned", "heldout", "q3", "personality", 2, status="invalid"),  # unparseable: no score
    score("tuned", "heldout", "q4", "personality", 7),
    score("tuned", "probes", "p1", "personality", 7),  # on a broken reply: never a score
    # hallucination on the probe only
    score("base", "probes", "p1", "hallucination", 5),
    # stability on the script only
    score("base", "scripts", "s01", "stability", 5),
    score("tuned", "scripts", "s01", "stability", 6),
    # pairwise, tuned against base
    pair("tuned", "heldout", "q1", "personality", "win"),
    pair("tuned", "heldout", "q2", "personality", "win"),
    pair("tuned", "heldout", "q3", "personality", "tie"),
    pair("tuned", "heldout", "q4", "personality", None),  # a call failed
    pair("tuned", "probes", "p1", "personality", "win"),  # on a broken reply: not counted
]


@pytest.fixture(scope="module")
def results() -> dict:
    return build_results(META, COMBOS, CRITERIA, REPLIES, VERDICTS)


def headline(results: dict, combo: str) -> dict:
    return next(row for row in results["headline"] if row["combo"] == combo)


def by_hand_wilson(k: int, n: int) -> tuple[float, float]:
    p, z = k / n, Z95
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


def test_the_frame(results):
    assert results["meta"] == {**META, "confidence": 0.95}
    assert results["combos"] == COMBOS and results["criteria"] == CRITERIA
    assert results["sets"] == ["heldout", "probes", "scripts"]
    assert [(r["combo"], r["label"], r["reference"]) for r in results["headline"]] == [
        ("base", "base · RAG off", True), ("tuned", "tuned · RAG off", False)]
    # answered: base all 6 questions; tuned 5 (its probe reply broke)
    assert headline(results, "base")["questions"] == 6
    assert headline(results, "tuned")["questions"] == 5


def test_means_and_missing_by_hand(results):
    base = headline(results, "base")["criteria"]
    tuned = headline(results, "tuned")["criteria"]
    # base personality: (4 + 5 + 3 + 6 + 4) / 5 = 22 / 5 = 4.4 over q1-q4 and p1
    assert base["personality"]["mean"] == pytest.approx(4.4)
    assert (base["personality"]["n"], base["personality"]["missing"]) == (5, 0)
    assert base["personality"]["lo"] <= 4.4 <= base["personality"]["hi"]
    assert base["personality"]["diff"] is None  # the reference
    # tuned personality: only q1 (6) and q4 (7) scored: (6 + 7) / 2 = 6.5. Missing: q2
    # (failed), q3 (invalid), p1 (broken reply, its stray 7 ignored) = 3. The script is not
    # judged on personality, so it is not missing.
    assert tuned["personality"]["mean"] == pytest.approx(6.5)
    assert (tuned["personality"]["n"], tuned["personality"]["missing"]) == (2, 3)
    # hallucination (probes): base 5 of one question, lo == hi == mean; tuned none, missing 1
    assert base["hallucination"] == {"mean": 5.0, "lo": 5.0, "hi": 5.0, "n": 1, "missing": 0,
                                     "diff": None}
    assert (tuned["hallucination"]["mean"], tuned["hallucination"]["n"],
            tuned["hallucination"]["missing"]) == (None, 0, 1)
    assert tuned["hallucination"]["diff"] == {"mean": None, "lo": None, "hi": None, "p": None,
                                              "n": 0}
    # stability (scripts): 5 and 6, one question each
    assert base["stability"]["mean"] == 5.0 and tuned["stability"]["mean"] == 6.0


def test_paired_difference_over_questions_both_scored(results):
    diff = headline(results, "tuned")["criteria"]["personality"]["diff"]
    # both scored q1 and q4 only: tuned - base = [6 - 4, 7 - 6] = [2, 1] -> mean 1.5;
    # Wilcoxon exact on two positive differences: p = 2 / 2^2 = 0.5
    assert diff["n"] == 2
    assert diff["mean"] == pytest.approx(1.5)
    assert diff["p"] == pytest.approx(0.5)
    assert 1 <= diff["lo"] <= 1.5 <= diff["hi"] <= 2
    # one script: n = 1, 6 - 5 = 1, no interval
    assert headline(results, "tuned")["criteria"]["stability"]["diff"] == {
        "mean": 1.0, "lo": None, "hi": None, "p": None, "n": 1}


def test_pairwise_rates(results):
    assert headline(results, "base")["pairwise"] == {}
    rates = headline(results, "tuned")["pairwise"]
    assert list(rates) == ["personality"]
    # win q1, win q2, tie q3; q4 failed and p1 broke: n = 3 -> 2 wins, 1 tie, 0 losses
    got = rates["personality"]
    assert got["n"] == 3
    for outcome, k in (("win", 2), ("tie", 1), ("loss", 0)):
        assert (got[outcome]["k"], got[outcome]["n"]) == (k, 3)
        assert got[outcome]["rate"] == pytest.approx(k / 3)
        assert (got[outcome]["lo"], got[outcome]["hi"]) == pytest.approx(by_hand_wilson(k, 3),
                                                                         abs=1e-9)
    # 0 of 3: hi = z² / (3 + z²) = 3.8415 / 6.8415 = 0.5615
    assert got["loss"]["hi"] == pytest.approx(0.5615, abs=1e-4)


def test_style_and_facts_count_whole_replies(results):
    base, tuned = headline(results, "base"), headline(results, "tuned")
    # ends: base 2 of 6, tuned 4 of 5 (the broken reply is not a reply)
    assert (base["style"]["ends"]["k"], base["style"]["ends"]["n"]) == (2, 6)
    assert (tuned["style"]["ends"]["k"], tuned["style"]["ends"]["n"]) == (4, 5)
    assert (tuned["style"]["ends"]["lo"], tuned["style"]["ends"]["hi"]) == pytest.approx(
        by_hand_wilson(4, 5), abs=1e-9)
    assert tuned["style"]["stop"]["k"] == 5  # the broken reply's stop is not counted
    assert set(base["style"]) == {"ends", "register", "one_sentence", "stop", "newlines",
                                  "median_chars"}
    # medians: base (5 7 9 12 20 30) -> (9 + 12) / 2 = 10.5; tuned (10 16 20 30 41) -> 20
    assert base["style"]["median_chars"] == 10.5
    assert tuned["style"]["median_chars"] == 20.0
    # facts: q4 only; base missed (0 of 1), tuned hit (1 of 1)
    assert (base["facts"]["k"], base["facts"]["n"]) == (0, 1)
    assert (tuned["facts"]["k"], tuned["facts"]["n"], tuned["facts"]["rate"]) == (1, 1, 1.0)


def test_no_fact_question_gives_no_fact_rate():
    replies = [{**r, "fact_hit": None} for r in REPLIES]
    out = build_results(META, COMBOS, CRITERIA, replies, VERDICTS, n_resamples=200)
    assert [row["facts"] for row in out["headline"]] == [None, None]


def test_distributions_count_ok_verdicts(results):
    dist = results["distributions"]
    # base personality 4 5 3 6 4; tuned 6 7 (the failed, invalid and broken ones left out)
    assert dist["base"]["personality"] == {"1": 0, "2": 0, "3": 1, "4": 2, "5": 1, "6": 1,
                                           "7": 0}
    assert dist["tuned"]["personality"] == {"1": 0, "2": 0, "3": 0, "4": 0, "5": 0, "6": 1,
                                            "7": 1}
    assert sum(dist["tuned"]["hallucination"].values()) == 0
    assert dist["tuned"]["stability"]["6"] == 1


def test_question_table(results):
    table = results["questions"]
    # the lab question (q2, written with a full-width ？) first, then first-seen order
    assert [(q["set"], q["id"]) for q in table] == [
        ("heldout", "q2"), ("heldout", "q1"), ("heldout", "q3"), ("heldout", "q4"),
        ("probes", "p1"), ("scripts", "s01")]
    q2, q1 = table[0], table[1]
    assert q2["question"] == "あなたの名前はなんですか？" and q2["transcript"] is None
    assert q1["replies"]["base"] == {"text": "ご" * 5, "stop": "eos", "error": None,
                                     "scores": {"personality": 4}, "pairwise": {},
                                     "fact_hit": None}
    assert q1["replies"]["tuned"]["scores"] == {"personality": 6}
    assert q1["replies"]["tuned"]["pairwise"] == {"personality": "win"}
    # disagreement: q1 6 - 4 = 2; q2 only base scored (tuned failed) -> 0
    assert q1["disagreement"] == pytest.approx(2.0)
    assert q2["disagreement"] == 0.0
    assert q2["replies"]["tuned"]["scores"] == {"personality": None}
    # the broken probe reply: shown with its error, no score, no pairwise outcome
    p1 = table[4]
    broken = p1["replies"]["tuned"]
    assert broken["error"] == "CUDA out of memory" and broken["stop"] == "error"
    assert broken["scores"] == {"personality": None, "hallucination": None}
    assert broken["pairwise"] == {"personality": None}
    assert p1["replies"]["base"]["scores"] == {"personality": 4, "hallucination": 5}
    assert p1["disagreement"] == 0.0
    # the script: its user turns, its stability scores, 6 - 5 = 1 apart
    s01 = table[5]
    assert s01["transcript"] == [{"role": "user", "content": c} for r, c in SCRIPT
                                 if r == "user"]
    assert s01["replies"]["tuned"]["scores"] == {"stability": 6}
    assert s01["disagreement"] == pytest.approx(1.0)
    assert table[3]["replies"]["tuned"]["fact_hit"] is True


def test_samples_average_per_question_and_count_per_reply():
    # q1 asked twice (scores 3 and 6 -> 4.5), q2 twice (7, and a failed verdict -> 7):
    # mean over questions (4.5 + 7) / 2 = 5.75, not over verdicts (3 + 6 + 7) / 3 = 5.33
    replies = [reply("base", "heldout", q, chars=c, ends=e, sample=s)
               for q, s, c, e in (("q1", 0, 4, True), ("q1", 1, 8, False),
                                  ("q2", 0, 6, True), ("q2", 1, 10, True))]
    verdicts = [score("base", "heldout", "q1", "personality", 3, sample=0),
                score("base", "heldout", "q1", "personality", 6, sample=1),
                score("base", "heldout", "q2", "personality", 7, sample=0),
                score("base", "heldout", "q2", "personality", None, status="failed", sample=1)]
    out = build_results({**META, "samples": 2}, COMBOS[:1], CRITERIA[:1], replies, verdicts,
                        n_resamples=200)
    row = out["headline"][0]
    assert row["criteria"]["personality"]["mean"] == pytest.approx(5.75)
    assert (row["criteria"]["personality"]["n"], row["criteria"]["personality"]["missing"]) \
        == (2, 0)
    assert row["questions"] == 2
    # style counts the four replies: ends 3 of 4; median chars of 4 6 8 10 = 7
    assert (row["style"]["ends"]["k"], row["style"]["ends"]["n"]) == (3, 4)
    assert row["style"]["median_chars"] == 7.0
    # the table shows the first sample and its own score
    assert out["questions"][1]["replies"]["base"]["scores"] == {"personality": 3}
    assert out["distributions"]["base"]["personality"]["3"] == 1


def test_a_resumed_run_counts_each_verdict_once():
    # the job failed on q1, then a rerun asked again and got a 6; q2's ok verdict written
    # twice: one question, one score each
    verdicts = [score("base", "heldout", "q1", "personality", None, status="failed"),
                score("base", "heldout", "q2", "personality", 4),
                score("base", "heldout", "q1", "personality", 6),
                score("base", "heldout", "q2", "personality", 4)]
    replies = [reply("base", "heldout", q, chars=5, ends=True) for q in ("q1", "q2")]
    out = build_results(META, COMBOS[:1], CRITERIA[:1], replies, verdicts, n_resamples=200)
    crit = out["headline"][0]["criteria"]["personality"]
    assert (crit["mean"], crit["n"], crit["missing"]) == (5.0, 2, 0)
    assert out["distributions"]["base"]["personality"]["4"] == 1


def test_build_is_deterministic(results):
    # same records, same seed: the same intervals, to the last digit
    again = build_results(META, COMBOS, CRITERIA, iter(REPLIES), iter(VERDICTS))
    assert again == results
    other = build_results(META, COMBOS, CRITERIA, REPLIES, VERDICTS, seed=1)
    assert other["headline"][0]["criteria"]["personality"]["mean"] == pytest.approx(4.4)


def test_results_round_trip(results, tmp_path):
    path = write_results(results, tmp_path / "evals" / "t")
    assert path == tmp_path / "evals" / "t" / "results.json"
    text = path.read_text(encoding="utf-8")
    assert "あなたの名前はなんですか" in text  # not \\u-escaped
    assert load_results(path.parent) == results
    assert load_results(path) == json.loads(text)
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]  # no temp file left


def test_load_results_errors_are_one_line(tmp_path):
    with pytest.raises(ValueError) as missing:
        load_results(tmp_path)
    (tmp_path / "results.json").write_text('{"meta": {"name": "t"},\n "head', encoding="utf-8")
    with pytest.raises(ValueError) as corrupt:
        load_results(tmp_path)
    (tmp_path / "results.json").write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(ValueError) as shape:
        load_results(tmp_path / "results.json")
    (tmp_path / "results.json").write_bytes(b"\xff\xfe{")
    with pytest.raises(ValueError) as binary:
        load_results(tmp_path)
    for err in (missing, corrupt, shape, binary):
        message = str(err.value)
        assert "\n" not in message and "results.json" in message
    assert "not valid JSON" in str(corrupt.value)


def test_importable_without_torch():
    # nor scipy.stats until a number is computed: loading results.json stays quick
    code = ("import sys, pipelines.evaluation.results, pipelines.evaluation.stats; "
            "print([m for m in ('torch', 'textual', 'llama_cpp', 'scipy.stats') "
            "if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip() == "[]"
