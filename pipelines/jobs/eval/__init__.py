"""The `eval` job: variants x retrieval off/on over the persona's held-out question sets,
generated once, judged on every criterion and pairwise against a reference, summarised
with confidence intervals and written up as report.md / report.html.

`run` is the list of its stages:

    validate    validate    the config, the variants (loadable here), the judge, the sets
    plan        plan        counts, judge calls, estimated tokens and dollars (plan.json);
                            refused above max_cost_usd unless force: true
    generate    generate    each variant loaded once; every combination answers every item
                            (replies.jsonl and the store's messages, as they come)
    judge       judge       every reply on its set's criteria (the judge's cache, retries)
    pairwise    pairwise    each combination against the reference, both orders
    results     results     the statistics (results.json)
    report      report      report.md and a self-contained report.html

Everything lands in the output folder (<home>/evals/<name>/ by default). A rerun resumes
there: a reply whose id (run, combination, set, item, sample and a digest of everything
that shapes it) is in replies.jsonl without an error is not generated again, and every
verdict already in the store's judgments table is served from the judge's cache, so a run
killed with SIGKILL at any point repeats no finished work.

With `batch: true` the judge and pairwise stages go through the OpenAI Batch API
(pipelines.judge.batch_api: half the price; batch-<stage>.json in the output folder lets a
restarted run re-attach to its batch), and the plan prices them at the batch price.

One module a step: setup.py (what the run works on, validation; the judge and the
retriever, opened once per run and passed to the steps in `Setup`), cost.py (the plan),
generate.py (the turn loop), replies.py (reply records: ids, replies.jsonl, measuring,
the store), simulator.py (the simulated user, retried like the judge), judging.py (the
judge and pairwise stages), stats.py (results and report).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from pipelines import events as ev
from pipelines.config import EvalJob
from pipelines.events import Event
from pipelines.jobs import JobContext
from pipelines.jobs.eval.cost import (
    ANSWER_TOKENS,
    CHOICE_TOKENS,
    describe_plan,
    estimate_cost,
    estimate_tokens,
    plan,
    typical_reply,
)
from pipelines.jobs.eval.generate import generate
from pipelines.jobs.eval.judging import JUDGE_CHUNK, judge, pairwise
from pipelines.jobs.eval.replies import _append, fact_hit, read_replies, reply_id
from pipelines.jobs.eval.setup import (
    PLAN,
    REPLIES,
    SINGLE_TURN,
    VERDICTS,
    Combo,
    Item,
    Setup,
    onoff,
    output_dir,
    validate,
)
from pipelines.jobs.eval.simulator import SIMULATOR_PROMPT
from pipelines.jobs.eval.stats import headline, report, statistics


def run(cfg: EvalJob, ctx: JobContext) -> Iterator[Event]:
    started = time.perf_counter()
    combos_text = f"{len(cfg.variants)} variant(s) x RAG {'/'.join(map(onoff, cfg.rag))}"
    yield ev.start("eval", cfg.name, f"{combos_text} on {', '.join(cfg.sets)}")
    setup = yield from validate(cfg, ctx)
    try:
        yield from plan(cfg, ctx, setup)
        replies = yield from generate(cfg, ctx, setup)
        verdicts = yield from judge(cfg, ctx, setup, replies)
        verdicts += yield from pairwise(cfg, ctx, setup, replies)
        results = yield from statistics(cfg, ctx, setup, replies, verdicts)
        paths = yield from report(ctx, setup, results)
    finally:
        setup.close()
    yield ev.done({
        "output": str(setup.out),
        "results": str(setup.out / "results.json"),
        "report_html": str(paths[1]),
        "report_md": str(paths[0]),
        "replies": len(replies),
        "generated": setup.generated,
        "judge_requests": setup.judge_requests,
        "headline": headline(results, cfg.criteria),
        "seconds": round(time.perf_counter() - started, 1),
    })


__all__ = [
    "ANSWER_TOKENS",
    "CHOICE_TOKENS",
    "JUDGE_CHUNK",
    "PLAN",
    "REPLIES",
    "SIMULATOR_PROMPT",
    "SINGLE_TURN",
    "VERDICTS",
    "Combo",
    "Item",
    "Setup",
    "_append",
    "describe_plan",
    "estimate_cost",
    "estimate_tokens",
    "fact_hit",
    "generate",
    "judge",
    "output_dir",
    "pairwise",
    "plan",
    "read_replies",
    "reply_id",
    "report",
    "run",
    "statistics",
    "typical_reply",
    "validate",
]
