"""pipelines/evaluation/arena.py and `kyara arena`: Bradley–Terry ratings on data whose
answer is known by hand."""

import json
import math
import uuid

import pytest
from typer.testing import CliRunner

from console.cli import app
from pipelines import feedback as fb
from pipelines.evaluation.arena import (
    Game,
    agreement,
    arena,
    fit,
    games_from_preferences,
    rate,
)
from store import Store, new_id, utcnow


def games(first, second, n, tie=False):
    return [Game(first, second, tie)] * n


def test_eight_wins_in_ten_is_a_gap_of_log_4():
    played = games("A", "B", 8) + games("B", "A", 2)
    exact = fit(played, prior=0)
    assert exact["A"] - exact["B"] == pytest.approx(math.log(4), abs=1e-9)
    assert exact["A"] == pytest.approx(-exact["B"])  # centred
    assert fit(played)["A"] - fit(played)["B"] == pytest.approx(math.log(4), rel=1e-2)


def test_three_players_in_a_chain():
    # A beats B 2:1, B beats C 2:1, A beats C 4:1: strengths 4, 2, 1 fit every pair exactly
    played = (games("A", "B", 2) + games("B", "A", 1) + games("B", "C", 2) + games("C", "B", 1)
              + games("A", "C", 4) + games("C", "A", 1))
    r = fit(played, prior=0)
    assert r["A"] - r["B"] == pytest.approx(math.log(2), abs=1e-9)
    assert r["B"] - r["C"] == pytest.approx(math.log(2), abs=1e-9)
    assert sum(r.values()) == pytest.approx(0, abs=1e-12)


def test_ties_count_half_a_win_each():
    # 3 wins and 2 ties out of 5 for A: 4 of 5 -> log(4); all ties -> equal
    r = fit(games("A", "B", 3) + games("A", "B", 2, tie=True), prior=0)
    assert r["A"] - r["B"] == pytest.approx(math.log(4), abs=1e-9)
    even = fit(games("A", "B", 4, tie=True), prior=0)
    assert even["A"] == pytest.approx(even["B"])


def test_an_unbeaten_player_gets_a_large_finite_rating():
    r = fit(games("A", "B", 5))
    assert 4 < r["A"] - r["B"] < 20 and all(math.isfinite(v) for v in r.values())


def test_bootstrap_intervals_contain_the_rating_and_shrink_with_more_games():
    few = rate(games("A", "B", 8) + games("B", "A", 2), samples=300, seed=1)
    many = rate((games("A", "B", 8) + games("B", "A", 2)) * 20, samples=300, seed=1)
    for board in (few, many):
        a = board.by_player()["A"]
        assert a.low < a.rating < a.high
        assert board.ratings[0].player == "A" and board.samples == 300
    assert (many.by_player()["A"].high - many.by_player()["A"].low
            < few.by_player()["A"].high - few.by_player()["A"].low)
    a = many.by_player()["A"]
    assert (a.games, a.wins, a.ties) == (200, 160, 0)
    assert a.elo == pytest.approx(1000 + 400 * math.log10(math.e) * a.rating)
    # seeded: the same intervals again
    again = rate((games("A", "B", 8) + games("B", "A", 2)) * 20, samples=300, seed=1)
    assert again.by_player()["A"].low == a.low


def test_one_game_has_no_interval():
    board = rate(games("A", "B", 1), samples=100)
    assert board.samples == 0 and board.ratings[0].low is None


def test_agreement_of_two_orders():
    human = rate(games("A", "B", 8) + games("B", "C", 8) + games("C", "B", 2)
                 + games("B", "A", 2), samples=0)
    same = rate(games("A", "B", 3) + games("B", "C", 3) + games("C", "D", 3), samples=0)
    a = agreement(human, same)
    assert a.players == ["A", "B", "C"] and a.pairs == 3
    assert a.concordance == 1 and a.spearman == pytest.approx(1.0)
    flipped = rate(games("B", "A", 3) + games("C", "B", 3), samples=0)
    b = agreement(human, flipped)
    assert b.concordance == 0 and b.spearman == pytest.approx(-1.0)
    assert agreement(human, rate(games("A", "Z", 1), samples=0)).concordance is None


def pref(chosen, rejected, tie=False, source="human"):
    return {"variants_json": json.dumps({"chosen": chosen, "rejected": rejected}),
            "tie": tie, "source": source}


def test_games_from_preferences():
    played, skipped = games_from_preferences([
        pref("v2", "v1"), pref("v1", "v2", tie=True), pref(None, "v1"), pref("v1", "v1"),
        {"variants_json": "{broken", "tie": False}])
    assert played == [Game("v2", "v1"), Game("v1", "v2", True)] and skipped == 3


# --- from the store, and the command ------------------------------------------------------------


@pytest.fixture
def store(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("KYARA_HOME", str(home))
    return Store.open(home / "store")


def votes(store, chosen, rejected, n, tie=False):
    for _ in range(n):
        fb.record_preference(store, prompt=[{"role": "user", "content": "q"}], chosen="a",
                             rejected="b", tie=tie, source="human",
                             variants={"chosen": chosen, "rejected": rejected})


def judge_run(store, home, outcomes):
    """An eval run whose pairwise verdicts are `outcomes` of tuned vs the reference base."""
    folder = home / "evals" / "e1"
    folder.mkdir(parents=True)
    replies, verdicts, rows = [], [], []
    for k, outcome in enumerate(outcomes):
        for combo in ("base", "tuned"):
            rid = str(uuid.uuid4())
            rows.append({"id": rid, "session_id": f"s-{combo}", "seq": 100 * k + 1,
                         "role": "assistant", "content": f"{combo} {k}", "created_at": utcnow()})
            replies.append({"id": rid, "combo": combo, "set": "heldout", "question_id": f"q{k}",
                            "sample": 0, "question": f"q{k}",
                            "transcript": [{"role": "user", "content": f"q{k}"},
                                           {"role": "assistant", "content": f"{combo} {k}"}]})
            if combo == "tuned":
                store.upsert("judgments", [{
                    "id": new_id(), "message_id": rid, "criterion": "pairwise:personality",
                    "judge_model": "m", "prompt_version": "pairwise-v1", "status": "ok",
                    "score": 1}])
        verdicts.append({"kind": "pairwise", "combo": "tuned", "reference": "base",
                         "set": "heldout", "question_id": f"q{k}", "sample": 0,
                         "criterion": "personality", "outcome": outcome})
    store.upsert("messages", rows)
    for name, data in (("replies.jsonl", replies), ("verdicts.jsonl", verdicts)):
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in data))
    return folder


def test_human_and_judge_arenas_from_the_store(store, tmp_path):
    votes(store, "tuned", "base", 8)
    votes(store, "base", "tuned", 2)
    folder = judge_run(store, tmp_path / "home", ["win"] * 3 + ["loss"] + ["tie"] * 2)
    human = arena(store, "human", samples=50)
    assert human.ratings[0].player == "tuned" and human.games == 10
    assert human.by_player()["tuned"].rating - human.by_player()["base"].rating == \
        pytest.approx(math.log(4), rel=1e-2)
    judge = arena(store, "judge", eval_dirs=[folder], samples=50)
    assert judge.games == 6 and judge.by_player()["tuned"].ties == 2
    # 3 wins, 2 ties, 1 loss: 4 of 6 -> a gap of log(2)
    gap = judge.by_player()["tuned"].rating - judge.by_player()["base"].rating
    assert gap == pytest.approx(math.log(2), rel=1e-2)
    assert agreement(human, judge).concordance == 1
    assert arena(store, "judge", eval_dirs=[folder], criterion="style", samples=0).games == 0


def test_kyara_arena(store, tmp_path):
    votes(store, "tuned", "base", 3)
    votes(store, "base", "tuned", 1, tie=True)
    judge_run(store, tmp_path / "home", ["win", "win", "loss"])
    result = CliRunner().invoke(app, ["arena", "--samples", "50"], env={"COLUMNS": "160"},
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert "arena · human votes · 4 games" in text and "judge's pairwise verdicts" in text
    assert "tuned" in text and "3/1/0" in text
    assert "agreement over 2 variants" in text and "100% of 1 pairs ordered alike" in text
    only = CliRunner().invoke(app, ["arena", "--source", "judge", "--samples", "0"],
                              env={"COLUMNS": "160"}, catch_exceptions=False)
    assert only.exit_code == 0 and "human" not in only.stdout and "agreement" not in only.stdout
    bad = CliRunner().invoke(app, ["arena", "--source", "crowd"], catch_exceptions=False)
    assert bad.exit_code == 2 and len(bad.output.strip().splitlines()) == 1


def test_kyara_arena_with_nothing_yet(store):
    result = CliRunner().invoke(app, ["arena"], env={"COLUMNS": "160"}, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "no games yet" in result.stdout
