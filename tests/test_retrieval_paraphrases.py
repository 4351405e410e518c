"""The held-out paraphrase set (configs/personas/ayane/paraphrases.jsonl): questions a user
would ask, each sharing no content word with the facts that answer it, so that recall on
it measures retrieval across wordings and not word overlap (issue 17)."""

from __future__ import annotations

import json
import unicodedata
from collections import Counter

import pytest

from pipelines.retrieval.analysis import content_words
from pipelines.workspace import Workspace
from tests.conftest import CONFIGS

PATH = CONFIGS / "personas" / "ayane" / "paraphrases.jsonl"
REGISTERS = {"casual", "polite", "indirect"}


@pytest.fixture(scope="module")
def rows():
    return [json.loads(line) for line in PATH.read_text(encoding="utf-8").splitlines()
            if line.strip()]


@pytest.fixture(scope="module")
def facts():
    return {f.id: f for f in Workspace.load(CONFIGS).persona_data("ayane").knowledge}


def test_at_least_80_questions_in_every_register(rows):
    assert len(rows) >= 80
    assert all(set(r) == {"id", "question", "knowledge_ids", "register"} for r in rows)
    counts = Counter(r["register"] for r in rows)
    assert set(counts) == REGISTERS and min(counts.values()) >= 10


def test_ids_are_unique_and_every_fact_exists(rows, facts):
    assert len({r["id"] for r in rows}) == len(rows)
    assert len({r["question"] for r in rows}) == len(rows)
    for r in rows:
        assert r["knowledge_ids"], r["id"]
        assert len(set(r["knowledge_ids"])) == len(r["knowledge_ids"]), r["id"]
        assert set(r["knowledge_ids"]) <= set(facts), r["id"]


def test_no_question_shares_a_content_word_with_its_facts(rows, facts):
    """Content words: nouns, verbs, adjectives, na-adjectives, adverbs (Sudachi's part of
    speech), in long and short units, compared on normalised and dictionary forms; the
    light verbs and formal nouns of analysis.LIGHT aside."""
    shared = []
    for r in rows:
        words = content_words(r["question"])
        for fid in r["knowledge_ids"]:
            common = words & content_words(facts[fid].text)
            if common:
                shared.append(f"{r['id']} {r['question']} / {fid}: {sorted(common)}")
    assert not shared, "\n".join(shared)


def test_the_rule_catches_shared_words_in_other_spellings():
    # 観る and 見る fold to one normalised form; 演劇部 shares 演劇 in its short units
    assert content_words("ミュージカルを観た") & content_words("映画を見る")
    assert "演劇" in content_words("演劇部の部長")
    assert not content_words("何をしているの？") - {"何"}  # light verbs are not content


def _plain(text: str) -> str:
    """How an ask is compared with a held-out question: NFKC, no spaces, no end marks."""
    return "".join(unicodedata.normalize("NFKC", text).split()).rstrip("?!。")


def test_no_written_ask_is_a_held_out_question(rows, facts):
    """The facts' `asks:` (knowledge.jsonl) were written without reading the held-out
    questions; this keeps it so: no ask is, word for word, a question of the paraphrase set
    or of the eval set. The message names fact ids only (the questions stay unread)."""
    held_out = {_plain(r["question"]) for r in rows}
    held_out |= {_plain(q.question) for q in
                 Workspace.load(CONFIGS).persona_data("ayane").eval}
    leaked = sorted(f.id for f in facts.values()
                    if any(_plain(a) in held_out for a in f.asks or ()))
    assert not leaked, f"facts with an ask that is a held-out question: {leaked}"


def test_every_shipped_fact_carries_written_asks(facts):
    """3-5 questions per fact, in the asker's words (issue 17): what lets a question
    worded unlike the fact find it without a judge model to generate them."""
    counts = {fid: len(f.asks or ()) for fid, f in facts.items()}
    assert all(3 <= n <= 5 for n in counts.values()), counts
    no_question = [f"{f.id}: {a}" for f in facts.values() for a in f.asks
                   if not a.endswith(("？", "?", "！", "ください", "ほしいな"))]
    assert not no_question, "asks that are neither a question nor a request: " + \
        "; ".join(no_question)
