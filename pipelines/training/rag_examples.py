"""Training examples on the retrieval prompt (issue 17): the train job's `rag_share`.

The shipped 270M adapter was trained on the plain system prompt only, and with retrieval
on it used the facts it was given no more often than without them. So a share of the
examples gets the prompt chat renders with retrieval on: the persona's `system_rag` with
the facts the real retriever returns for the example's last user turn (the turn whose
reply is trained; chat retrieves for the turn it answers, `ChatSession._answer`).

- The facts a dialogue names (`knowledge_ids`) go in when retrieval missed them, each in
  place of the lowest-ranked fact the dialogue does not name: every such example holds the
  fact its reply states among facts it must ignore. A dialogue naming none keeps what
  retrieval returned and learns to ignore it all.
- Which examples: a seeded shuffle of the conversations without a system prompt of their
  own, so a rerun picks the same ones (the checkpoint fingerprint stays the same).
- Fact texts come from the persona's index, as chat's do (a hit's text is the stored row).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from pipelines.config import ConfigError, Persona
from pipelines.prompting import format_context, system_prompt
from store import Store
from store.sql import quote


@dataclass
class RagCounts:
    """What the log and the run summary say about the retrieval prompts."""

    examples: int = 0        # conversations given the retrieval prompt
    of: int = 0              # conversations there were
    naming_facts: int = 0    # of the first, dialogues that name the facts they state
    gold_retrieved: int = 0  # named facts retrieval found in its top k
    gold_inserted: int = 0   # named facts put in because retrieval missed them

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    def text(self, share: float, k: int) -> str:
        gold = self.gold_retrieved + self.gold_inserted
        found = f" ({self.gold_retrieved / gold:.0%})" if gold else ""
        return (f"retrieval prompt: {self.examples} of {self.of} conversations (share "
                f"{share:g}, k {k}); {self.naming_facts} name their facts: "
                f"{self.gold_retrieved} named facts retrieved{found}, "
                f"{self.gold_inserted} put in")


def choose(n: int, share: float, seed: int) -> list[int]:
    """round(n * share) of range(n), the same for the same seed, in index order."""
    order = list(range(n))
    random.Random(f"rag-share:{seed}").shuffle(order)
    return sorted(order[:round(n * share)])


def last_user_turn(messages: Sequence[Mapping[str, Any]]) -> str:
    return next(m["content"] for m in reversed(messages) if m["role"] == "user")


def with_gold(hits: Sequence[tuple[str, str]], gold: Sequence[tuple[str, str]], k: int
              ) -> tuple[list[tuple[str, str]], int, list[str]]:
    """The (fact id, text) list for the prompt: retrieval's top k, each gold fact it missed
    in place of the lowest-ranked fact that is not gold (appended while there are fewer
    than k). Returns (facts, how many gold facts were retrieved, the ids put in)."""
    facts = list(hits[:k])
    gold = list(dict(gold).items())[:k]  # each named fact once; never more than k
    gold_ids = {fid for fid, _ in gold}
    have = {fid for fid, _ in facts}
    retrieved = sum(fid in have for fid, _ in gold)
    inserted: list[str] = []
    for fact in gold:
        if fact[0] in have:
            continue
        if len(facts) < k:
            facts.append(fact)
        else:
            slot = max(i for i, (fid, _) in enumerate(facts) if fid not in gold_ids)
            facts[slot] = fact
        have.add(fact[0])
        inserted.append(fact[0])
    return facts, retrieved, inserted


def rag_system_prompt(persona: Persona, texts: Sequence[str]) -> str:
    """The system prompt chat renders with retrieval on, for these fact texts in this
    order."""
    return system_prompt(persona, format_context(texts))


def indexed_facts(store: Store, persona: str) -> dict[str, str]:
    """Fact id -> text, as the persona's index holds them (what a hit carries)."""
    if store.knowledge_dim() is None:
        return {}
    rows = store.rows("knowledge", where=f"persona = {quote(persona)}")
    return {r["fact_id"]: r["text"] for r in rows}


def check_named_facts(rows: Sequence[Mapping[str, Any]], facts: Mapping[str, str],
                      persona: str) -> None:
    """Every knowledge_ids entry must be an indexed fact: a typo would silently train
    without the fact it names."""
    for index, row in enumerate(rows):
        for fid in row.get("knowledge_ids") or ():
            if fid not in facts:
                raise ConfigError(f"dialogue {row.get('id', index)}: knowledge_ids: {fid} is "
                                  f"not one of persona {persona}'s indexed facts")


def add_rag_prompts(rows: Sequence[dict[str, Any]], persona: Persona, retriever: Any,
                    facts: Mapping[str, str], share: float, k: int, seed: int,
                    keep_plain: bool = False) -> tuple[list[dict[str, Any]], RagCounts]:
    """New rows: the chosen conversations with the retrieval prompt as their first
    (system) message and a `rag` record (the fact ids in the prompt, those put in), each
    after its plain copy when `keep_plain`; the others as they were."""
    check_named_facts(rows, facts, persona.id)
    eligible = [i for i, r in enumerate(rows) if r["messages"][0]["role"] != "system"]
    chosen = {eligible[j] for j in choose(len(eligible), share, seed)}
    counts = RagCounts(of=len(rows))
    out: list[dict[str, Any]] = []
    for index, row in enumerate(rows):
        if index not in chosen or keep_plain:
            out.append(row)
        if index not in chosen:
            continue
        hits = retriever.search(last_user_turn(row["messages"]), k=k)
        gold = [(fid, facts[fid]) for fid in row.get("knowledge_ids") or ()]
        prompt_facts, retrieved, inserted = with_gold(
            [(h.fact_id, h.text) for h in hits], gold, k)
        counts.examples += 1
        counts.naming_facts += bool(gold)
        counts.gold_retrieved += retrieved
        counts.gold_inserted += len(inserted)
        system = rag_system_prompt(persona, [text for _, text in prompt_facts])
        out.append({**row,
                    "messages": [{"role": "system", "content": system}, *row["messages"]],
                    "rag": {"facts": [fid for fid, _ in prompt_facts], "inserted": inserted}})
    return out, counts
