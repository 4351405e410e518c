"""The eval job's judge and pairwise stages, on the run's one Judge (`Setup.judge`, opened
in validate, driven chunk by chunk on `Setup.loop`): every good reply on its set's
criteria, and each combination against the reference in both orders. With `batch: true`
both go through the OpenAI Batch API (batch-<stage>.json lets a restarted run re-attach)."""

from __future__ import annotations

import asyncio
from collections.abc import Generator, Sequence
from typing import Any

from pipelines import events as ev
from pipelines.config import EvalJob
from pipelines.events import Event
from pipelines.jobs import JobContext
from pipelines.jobs.eval.setup import SINGLE_TURN, Setup
from pipelines.judge.batch_api import judge_batch
from pipelines.judge.pairwise import choice_of, outcome
from pipelines.judge.verdict import Interaction

JUDGE_CHUNK = 32  # verdicts asked per step of the judge stage (progress and cancel points)
Comparison = tuple[dict[str, Any], Any, str]  # a reply, its reference reply, a criterion


def judge(cfg: EvalJob, ctx: JobContext, setup: Setup, replies: Sequence[dict[str, Any]]
          ) -> Generator[Event, None, list[dict[str, Any]]]:
    """Every good reply on its set's criteria. A broken reply is not judged (it is missing
    in the statistics, never a score)."""
    pairs = [(r, c) for r in replies if not r.get("error")
             for c in setup.criteria[r["set"]]]
    yield ev.stage("judge", f"{len(pairs)} verdicts by {setup.judge_config.model}"
                   + (" through the Batch API" if cfg.batch else ""))
    judge_, loop = setup.judge, setup.loop
    records: list[dict[str, Any]] = []
    try:
        if cfg.batch:
            asks = [judge_.score_ask(Interaction.from_messages(r["transcript"], id=r["id"]), c)
                    for r, c in pairs]
            found_ = yield from _batch(cfg, ctx, setup, asks, "judge")
            records = [_score_record(r, v) for (r, _), v in zip(pairs, found_, strict=True)]
            pairs = []  # all asked
        for start in range(0, len(pairs), JUDGE_CHUNK):
            chunk = pairs[start:start + JUDGE_CHUNK]
            by_criteria: dict[str, list[Any]] = {}
            for reply, criterion in chunk:
                by_criteria.setdefault(criterion, []).append(
                    Interaction.from_messages(reply["transcript"], id=reply["id"]))
            found: dict[tuple[str, str], Any] = {}
            for criterion, interactions in by_criteria.items():
                unique = list({i.id: i for i in interactions}.values())
                found.update(loop.run_until_complete(judge_.score_items(unique, [criterion])))
            loop.run_until_complete(judge_.flush())
            for reply, criterion in chunk:
                records.append(_score_record(reply, found[(reply["id"], criterion)]))
            yield ev.progress(min(start + JUDGE_CHUNK, len(pairs)), len(pairs), "verdicts",
                              stage="judge")
            ctx.check_cancelled()
    finally:
        setup.count_requests()
    failed = [r for r in records if r["status"] != "ok"]
    if failed:
        yield ev.log(f"{len(failed)} verdict(s) without a score (missing in the report; a "
                     f"rerun asks the failed ones again): {failed[0]['error'] or 'no score'}",
                     level="warning")
    return records


def _batch(cfg: EvalJob, ctx: JobContext, setup: Setup, asks: list[Any], stage: str
           ) -> Generator[Event, None, list[Any]]:
    """A stage's verdicts through the Batch API; batch-<stage>.json in the output folder
    lets a restarted run re-attach to its batch."""
    return (yield from judge_batch(setup.judge, asks, setup.out / f"batch-{stage}.json",
                                   loop=setup.loop, poll_s=cfg.batch_poll_s,
                                   timeout_s=cfg.batch_timeout_s, stage=stage,
                                   check_cancelled=ctx.check_cancelled))


def _score_record(reply: dict[str, Any], verdict: Any) -> dict[str, Any]:
    return {"kind": "score", "reply_id": reply["id"], "combo": reply["combo"],
            "set": reply["set"], "question_id": reply["question_id"], "sample": reply["sample"],
            "criterion": verdict.criterion, "status": verdict.status, "score": verdict.score,
            "reasoning": verdict.reasoning,
            "error": verdict.error or (verdict.error_kind if verdict.status != "ok" else None)}


# --- pairwise ----------------------------------------------------------------------------


def _comparisons(cfg: EvalJob, setup: Setup, replies: Sequence[dict[str, Any]]
                 ) -> list[Comparison]:
    reference = {(r["set"], r["question_id"], r["sample"]): r for r in replies
                 if r["combo"] == setup.reference.id}
    found: list[Comparison] = []
    for reply in replies:
        if reply["combo"] == setup.reference.id or reply["set"] not in SINGLE_TURN:
            continue
        ref = reference.get((reply["set"], reply["question_id"], reply["sample"]))
        for criterion in cfg.pairwise_criteria:
            found.append((reply, ref, criterion))
    return found


def _both_there(job: Comparison) -> bool:
    reply, ref, _ = job
    return ref is not None and not ref.get("error") and not reply.get("error")


def _orders(judge_: Any, reply: dict[str, Any], ref: dict[str, Any], criterion: str
            ) -> list[Any]:
    """The two asks of one comparison (the reply first, then the reference first)."""
    conversation = Interaction.from_pair(reply["question"], "")
    return [judge_.prefer_ask(conversation, reply["text"], ref["text"], criterion,
                              message_id=reply["id"]),
            judge_.prefer_ask(conversation, ref["text"], reply["text"], criterion,
                              message_id=reply["id"])]


async def _both(judge_: Any, reply: dict[str, Any], ref: dict[str, Any], criterion: str
                ) -> dict[str, Any]:
    conversation = Interaction.from_pair(reply["question"], "")
    first, second = await asyncio.gather(
        judge_.prefer(conversation, reply["text"], ref["text"], criterion,
                      message_id=reply["id"]),
        judge_.prefer(conversation, ref["text"], reply["text"], criterion,
                      message_id=reply["id"]))
    return _pair_record(reply, ref, criterion, first, second)


def _pair_record(reply: dict[str, Any], ref: dict[str, Any], criterion: str, first: Any,
                 second: Any) -> dict[str, Any]:
    a, b = choice_of(first), choice_of(second)
    return {"kind": "pairwise", "combo": reply["combo"], "reference": ref["combo"],
            "set": reply["set"], "question_id": reply["question_id"],
            "sample": reply["sample"], "criterion": criterion, "first": a, "second": b,
            "outcome": outcome(a, b),
            "error": next((v.error or v.error_kind for v in (first, second)
                           if v.status != "ok"), None)}


def _unpaired(setup: Setup, reply: dict[str, Any], criterion: str) -> dict[str, Any]:
    return {"kind": "pairwise", "combo": reply["combo"], "reference": setup.reference.id,
            "set": reply["set"], "question_id": reply["question_id"],
            "sample": reply["sample"], "criterion": criterion, "first": None,
            "second": None, "outcome": None, "error": "a reply is missing"}


def pairwise(cfg: EvalJob, ctx: JobContext, setup: Setup, replies: Sequence[dict[str, Any]]
             ) -> Generator[Event, None, list[dict[str, Any]]]:
    """Each combination against the reference on the single-turn sets, asked twice with
    the positions swapped; orders that disagree are a tie."""
    if not cfg.pairwise_criteria or len(setup.combos) < 2:
        return []
    jobs_ = _comparisons(cfg, setup, replies)
    yield ev.stage("pairwise", f"{len(jobs_)} comparisons with {setup.reference.id}, "
                   "both orders")
    judge_, loop = setup.judge, setup.loop
    records: list[dict[str, Any]] = []
    try:
        batched: dict[int, dict[str, Any]] = {}
        if cfg.batch:
            ready = [i for i, job in enumerate(jobs_) if _both_there(job)]
            asks = [a for i in ready for a in _orders(judge_, *jobs_[i])]
            found_ = yield from _batch(cfg, ctx, setup, asks, "pairwise")
            batched = {i: _pair_record(*jobs_[i], found_[2 * n], found_[2 * n + 1])
                       for n, i in enumerate(ready)}
        for start in range(0, len(jobs_), JUDGE_CHUNK):
            chunk = jobs_[start:start + JUDGE_CHUNK]
            records += [_unpaired(setup, reply, criterion)
                        for reply, ref, criterion in chunk
                        if not _both_there((reply, ref, criterion))]
            if cfg.batch:
                records += [batched[i] for i in range(start, start + len(chunk)) if i in batched]
            else:
                records += loop.run_until_complete(_gather([
                    _both(judge_, *job) for job in chunk if _both_there(job)]))
            loop.run_until_complete(judge_.flush())
            yield ev.progress(min(start + JUDGE_CHUNK, len(jobs_)), len(jobs_), "comparisons",
                              stage="pairwise")
            ctx.check_cancelled()
    finally:
        setup.count_requests()
    return records


async def _gather(tasks: list[Any]) -> list[Any]:
    return list(await asyncio.gather(*tasks))
