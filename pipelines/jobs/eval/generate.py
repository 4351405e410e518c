"""The eval job's generate stage: each variant loaded once; every combination answers every
item through the one turn (pipelines.turn: the prompt with the facts retrieval finds when
the combination has retrieval on, the history by the one rule, the reply streamed), the
hf backend's single questions in batches; each record appended to replies.jsonl and
stored as it comes."""

from __future__ import annotations

import time
from collections.abc import Generator, Sequence
from typing import Any

from pipelines import events as ev
from pipelines import turn
from pipelines.config import ConfigError, EvalJob
from pipelines.events import Event
from pipelines.inference.base import BackendError, GenerationOptions
from pipelines.inference.registry import load_backend
from pipelines.jobs import JobContext
from pipelines.jobs.eval.replies import (
    _append,
    measure,
    missing,
    new_record,
    read_replies,
    reply_id,
    shape,
    store_reply,
)
from pipelines.jobs.eval.setup import REPLIES, SINGLE_TURN, Combo, Item, Setup
from pipelines.jobs.eval.simulator import ask_simulator, close_simulator, open_simulator
from pipelines.prompting import TemplateError

Key = tuple[str, str, str, int]  # combination, set, item, sample


def generate(cfg: EvalJob, ctx: JobContext, setup: Setup
             ) -> Generator[Event, None, list[dict[str, Any]]]:
    """Every combination's replies, each variant loaded once; what a previous run finished
    is kept. Returns the reply records in (combination, item, sample) order."""
    path = setup.out / REPLIES
    done = {rid: r for rid, r in read_replies(path).items() if not r.get("error")}
    plan_ids = {(c.id, i.set, i.id, s): reply_id(cfg, c, i, s, shape(cfg, c, i, s, setup.persona))
                for c in setup.combos for i in setup.items for s in setup.samples(cfg)}
    todo = [key for key, rid in plan_ids.items() if rid not in done]
    total = len(plan_ids)
    yield ev.stage("generate", f"{total} replies" + (
        f" ({total - len(todo)} kept from an earlier run)" if len(todo) < total else ""))
    simulator = open_simulator(setup, ctx)
    by_variant: dict[str, list[Combo]] = {}
    for combo in setup.combos:
        by_variant.setdefault(combo.variant.name, []).append(combo)
    count = total - len(todo)
    try:
        for name, combos in by_variant.items():
            mine = [key for key in todo if key[0] in {c.id for c in combos}]
            if not mine:
                continue
            yield ev.log(f"loading {name} for {len(mine)} replies")
            try:
                backend = load_backend(combos[0].variant, ctx.home)
            except BackendError as exc:
                raise ConfigError(str(exc)) from None
            try:
                for step in _steps(cfg, backend, combos, mine):
                    combo = next(c for c in combos if c.id == step[0][0])
                    for record in _answer_step(cfg, setup, backend, simulator, combo, step,
                                               plan_ids):
                        _append(path, record)
                        store_reply(ctx, cfg, combo, setup.persona.id, record)
                        done[record["id"]] = record
                        setup.generated += 1
                        count += 1
                        yield from _warnings(combo, record)
                    yield ev.progress(count, total, "replies", stage="generate")
                    ctx.check_cancelled()
            finally:
                backend.close()
    finally:
        if simulator is not None:
            close_simulator(simulator)
    return [done[plan_ids[key]] if plan_ids[key] in done else missing(key, plan_ids[key])
            for key in plan_ids]


def _warnings(combo: Combo, record: dict[str, Any]) -> Generator[Event, None, None]:
    if record.get("notice"):
        yield ev.log(record["notice"], level="warning")
    if record.get("error"):
        yield ev.log(f"{combo.id} {record['set']}/{record['question_id']}: "
                     f"{record['error']}", level="warning")


def _batched(backend: Any) -> bool:
    """The backend's `batched` capability (a class attribute; False when not declared)."""
    return bool(getattr(type(backend), "batched", False))


def _steps(cfg: EvalJob, backend: Any, combos: list[Combo], mine: list[Key]) -> list[list[Key]]:
    """The order of work for one loaded variant: with a backend that generates in batches,
    the single-turn items in batches per combination, then the rest one by one."""
    if not _batched(backend):
        return [[k] for k in mine]
    steps: list[list[Key]] = []
    for combo in combos:
        single = [k for k in mine if k[0] == combo.id and k[1] in SINGLE_TURN]
        steps += [single[i:i + cfg.batch_size] for i in range(0, len(single), cfg.batch_size)]
    taken = {k for step in steps for k in step}
    return steps + [[k] for k in mine if k not in taken]


def _answer_step(cfg: EvalJob, setup: Setup, backend: Any, simulator: Any, combo: Combo,
                 step: list[Key], plan_ids: dict[Key, str]) -> list[dict[str, Any]]:
    items = {(i.set, i.id): i for i in setup.items}
    work = [(items[(k[1], k[2])], k[3], plan_ids[k]) for k in step]
    if _batched(backend) and step[0][1] in SINGLE_TURN:
        return _answer_batch(cfg, setup, backend, combo, work)
    return [_answer(cfg, setup, backend, simulator, combo, item, sample, rid)
            for item, sample, rid in work]


def _options(cfg: EvalJob, sample: int) -> GenerationOptions:
    if cfg.samples == 1:
        return GenerationOptions(max_new_tokens=cfg.max_new_tokens, temperature=0.0, top_p=1.0,
                                 top_k=1, seed=cfg.seed)
    return GenerationOptions(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                             seed=cfg.seed + sample)


def _prompt(setup: Setup, combo: Combo, pairs: list[tuple[str, str]], user: str) -> Any:
    """The chat engine's prompt for one user turn (`turn.build`: the persona's system
    prompt, with the facts the run's retriever finds for this turn when the combination
    has retrieval on; the history by the one rule, `turn.history`)."""
    hits = None
    if combo.rag and setup.retriever is not None:
        hits, _ = turn.retrieve(setup.retriever, user)
    return turn.build(setup.persona, turn.history(pairs), user, hits)


def _answer(cfg: EvalJob, setup: Setup, backend: Any, simulator: Any, combo: Combo,
            item: Item, sample: int, rid: str) -> dict[str, Any]:
    """One reply record, streamed (`turn.stream`, as chat streams): the item's turns
    answered in order (a script's whole conversation, the simulated user's next turn asked
    of the simulator), the last reply measured."""
    options = _options(cfg, sample)
    pairs: list[tuple[str, str]] = []
    turns = cfg.simulated_turns if item.set == "simulated" else len(item.turns)
    record = new_record(combo, item, sample, rid)
    started = time.perf_counter()
    text, final, rendered, hits = "", None, "", None
    for number in range(turns):
        if number < len(item.turns):
            user = item.turns[number]
        else:
            try:
                user = ask_simulator(simulator, setup, item, turn.history(pairs, None))
            except Exception as exc:  # the simulator's failure is this reply's, one line
                record["error"] = f"simulated user: {ev.one_line(str(exc))}"
                break
        prompt = _prompt(setup, combo, pairs, user)
        hits = prompt.hits
        reply = _drain(turn.stream(backend, prompt.messages, options))
        final, rendered, text = reply.final, reply.rendered or "", reply.text
        if reply.notice:
            record["notice"] = reply.notice
        if reply.error is not None or final is None or final.stop_reason not in ("eos", "length"):
            record["error"] = ev.one_line(reply.error or "the stream ended without a stop")
            break
        record["tokens"] += final.completion_tokens or 0
        record["turn_stops"].append(final.stop_reason)
        pairs.append((user, text))
    # the judge reads what the model was sent with the last reply, and that reply
    measure(setup, record, item, turn.history(pairs), text, final, rendered, hits,
            time.perf_counter() - started)
    return record


def _drain(stream: Any) -> Any:
    """A turn.stream run to its end: its Reply."""
    while True:
        try:
            next(stream)
        except StopIteration as done:
            return done.value


def _answer_batch(cfg: EvalJob, setup: Setup, backend: Any, combo: Combo,
                  todo: Sequence[tuple[Item, int, str]]) -> list[dict[str, Any]]:
    """Single-turn replies through the backend's `generate_batch` (an hf model: several
    prompts per forward pass), one call per sample's seed. A failed batch is each of its
    replies' error. The prompts each reply was given come with its Delta."""
    records: list[dict[str, Any]] = []
    for sample in sorted({s for _, s, _ in todo}):
        chosen = [(item, rid) for item, s, rid in todo if s == sample]
        prompts = [_prompt(setup, combo, [], item.question) for item, _ in chosen]
        started = time.perf_counter()
        try:
            finals = backend.generate_batch([p.messages for p in prompts],
                                            _options(cfg, sample), cfg.batch_size)
            error = None
        except (BackendError, TemplateError) as exc:
            finals, error = [None] * len(chosen), exc
        seconds = (time.perf_counter() - started) / max(1, len(chosen))
        for (item, rid), prompt, final in zip(chosen, prompts, finals, strict=True):
            record = new_record(combo, item, sample, rid)
            history: list[dict[str, str]] = []
            if error is not None or final is None:
                record["error"] = ev.one_line(str(error or "no reply"))
            else:
                record["tokens"] = final.completion_tokens or 0
                record["turn_stops"].append(final.stop_reason)
                history = [{"role": "user", "content": item.question},
                           {"role": "assistant", "content": final.text}]
            rendered = ((final.extra.get("rendered") if final is not None else None)
                        or turn.render(backend, prompt.messages) or "")
            measure(setup, record, item, history, final.text if final else "", final,
                    rendered, prompt.hits, seconds)
            records.append(record)
    return records
