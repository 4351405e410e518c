"""The eval job's plan: counts, judge calls, estimated tokens and dollars before any work
(plan.json), refused above max_cost_usd unless force: true."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from pipelines import events as ev
from pipelines.config import ConfigError, EvalJob
from pipelines.events import Event
from pipelines.jobs import JobContext
from pipelines.jobs.eval.setup import PLAN, SINGLE_TURN, Setup
from pipelines.judge.batch_api import batch_prices
from pipelines.judge.pairwise import build_pairwise_prompt
from pipelines.judge.verdict import Interaction

# What a judge answer costs in completion tokens (four reasoning steps in Japanese, then
# the score: 600-1200 tokens measured on gpt-4o-mini; a choice is a little shorter).
ANSWER_TOKENS = 800
CHOICE_TOKENS = 600
# A neutral stand-in reply, when the persona has no dialogue to take one from: a reply of
# the persona's usual length (speech.target_chars), one token a character.
NEUTRAL_CHAR = "あ"


def plan(cfg: EvalJob, ctx: JobContext, setup: Setup) -> Iterator[Event]:
    """Counts and cost before work; refused above max_cost_usd unless force: true."""
    yield ev.stage("plan", "what this run will ask for")
    estimate = estimate_cost(cfg, ctx, setup)
    (setup.out / PLAN).write_text(json.dumps(estimate, ensure_ascii=False, indent=2),
                                  encoding="utf-8")
    yield ev.log(describe_plan(estimate))
    dollars, ceiling = estimate.get("usd"), cfg.max_cost_usd
    if ceiling is not None and dollars is not None and dollars > ceiling and not cfg.force:
        raise ConfigError(f"estimated ${dollars:.2f} is above max_cost_usd ${ceiling:.2f}: "
                          "raise max_cost_usd or set force: true (kyara jobs run --force)")
    if ceiling is not None and dollars is None:
        yield ev.log(f"judge {setup.judge_config.name} has no prices: max_cost_usd not "
                     "checked", level="warning")


def estimate_tokens(text: str) -> int:
    """A provider-neutral estimate: ~4 ASCII characters or ~1 other character (kana, kanji)
    per token, as OpenAI's tokenisers come out on this persona's prompts (an over-estimate
    rather than an under-estimate)."""
    ascii_chars = sum(1 for ch in text if ord(ch) < 128)
    return ascii_chars // 4 + (len(text) - ascii_chars) + 1


def typical_reply(data: Any) -> str:
    """A reply as long as the persona's replies are, for pricing the judge's prompts: the
    last reply of its first training dialogue, else a neutral text of its usual length."""
    for dialogue in getattr(data, "dialogues", None) or ():
        replies = [m.content for m in dialogue.messages if m.role == "assistant"]
        if replies and replies[-1].strip():
            return replies[-1]
    return NEUTRAL_CHAR * data.persona.speech.target_chars


def _turns(cfg: EvalJob, item: Any) -> int:
    return len(item.turns) if item.set != "simulated" else cfg.simulated_turns


def _score_calls(cfg: EvalJob, setup: Setup, typical: str) -> tuple[int, int]:
    """Score calls and their prompt tokens: each criterion's prompt for the item's
    conversation, every reply the typical one."""
    calls_, tokens = 0, 0
    for item in setup.items:
        transcript = []
        for number in range(_turns(cfg, item)):
            transcript += [("user", item.turns[number] if number < len(item.turns)
                            else item.question), ("assistant", typical)]
        interaction = Interaction(tuple(transcript), item.id)
        for criterion in setup.criteria[item.set]:
            calls = len(setup.combos) * cfg.samples
            calls_ += calls
            tokens += calls * estimate_tokens(setup.judge.prompt(interaction, criterion).text)
    return calls_, tokens


def _pair_calls(cfg: EvalJob, setup: Setup, typical: str) -> tuple[int, int]:
    """Pairwise calls (both orders, every combination but the reference) and their tokens."""
    calls_, tokens = 0, 0
    for item in setup.items:
        if item.set not in SINGLE_TURN:
            continue
        for criterion in cfg.pairwise_criteria:
            calls = 2 * (len(setup.combos) - 1) * cfg.samples
            calls_ += calls
            text = build_pairwise_prompt(setup.judge.criterion(criterion), setup.persona,
                                         Interaction.from_pair(item.question, ""),
                                         typical, typical)
            tokens += calls * estimate_tokens(text)
    return calls_, tokens


def _prices(cfg: EvalJob, setup: Setup) -> tuple[Any, str]:
    if not cfg.batch:
        return setup.judge_config.prices, "live prices"
    prices, source = batch_prices(setup.judge_config)
    return prices, f"Batch API prices ({source})"


def estimate_cost(cfg: EvalJob, ctx: JobContext, setup: Setup) -> dict[str, Any]:
    """Generations, judge calls (scores and pairwise), estimated tokens and dollars: the
    prompt each criterion would send, built for a typical reply (`typical_reply`), times
    the calls."""
    typical = typical_reply(setup.data)
    generations = sum(_turns(cfg, i) for i in setup.items) * len(setup.combos) * cfg.samples
    score_calls, score_tokens = _score_calls(cfg, setup, typical)
    pair_calls, pair_tokens = _pair_calls(cfg, setup, typical)
    prompt_tokens = score_tokens + pair_tokens
    completion_tokens = score_calls * ANSWER_TOKENS + pair_calls * CHOICE_TOKENS
    prices, pricing = _prices(cfg, setup)
    usd = None
    if prices is not None:
        usd = round((prompt_tokens * prices.input + completion_tokens * prices.output) / 1e6, 4)
    counts: dict[str, int] = {}
    for item in setup.items:
        counts[item.set] = counts.get(item.set, 0) + 1
    return {
        "combinations": [c.id for c in setup.combos],
        "reference": setup.reference.id,
        "items": counts,
        "samples": cfg.samples,
        "generations": generations,
        "judge_calls": {"scores": score_calls, "pairwise": pair_calls},
        "estimated_tokens": {"prompt": prompt_tokens, "completion": completion_tokens},
        "judge": {"name": setup.judge_config.name, "model": setup.judge_config.model,
                  "prices_usd_per_mtok": prices.model_dump() if prices else None,
                  "pricing": pricing, "batch": cfg.batch},
        "usd": usd,
        "max_cost_usd": cfg.max_cost_usd,
    }


def describe_plan(p: dict[str, Any]) -> str:
    items = ", ".join(f"{n} {s}" for s, n in p["items"].items())
    calls = p["judge_calls"]
    tokens = p["estimated_tokens"]
    pricing = p["judge"].get("pricing", "live prices")
    money = (f"≈ ${p['usd']:.2f} at {p['judge']['model']}'s {pricing}" if p["usd"] is not None
             else f"{p['judge']['model']} has no prices: no dollar estimate")
    return (f"plan: {len(p['combinations'])} combinations x ({items}) x {p['samples']} "
            f"sample(s): {p['generations']} generations; judge calls: {calls['scores']} "
            f"scores + {calls['pairwise']} pairwise (at most: stored verdicts are not asked "
            f"again); ~{tokens['prompt'] / 1e3:.0f}k prompt + ~{tokens['completion'] / 1e3:.0f}k "
            f"completion tokens; {money}")
