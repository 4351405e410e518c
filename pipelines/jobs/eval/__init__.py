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
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import unicodedata
import uuid
from collections.abc import Generator, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines import events as ev
from pipelines import jobs, turn
from pipelines.config import ConfigError, EvalJob, Variant
from pipelines.events import Event
from pipelines.files import append_jsonl, read_jsonl_lines, write_jsonl
from pipelines.jobs import JobContext

REPLIES = "replies.jsonl"
VERDICTS = "verdicts.jsonl"
PLAN = "plan.json"
_NAMESPACE = uuid.UUID("0d6f3c52-9a7e-4c1b-8f0e-5b2a7c9e1d43")
SINGLE_TURN = ("heldout", "probes")   # the sets compared pairwise (one question, one reply)
# What a judge answer costs in completion tokens (four reasoning steps in Japanese, then
# the score: 600-1200 tokens measured on gpt-4o-mini; a choice is a little shorter).
ANSWER_TOKENS = 800
CHOICE_TOKENS = 600
JUDGE_CHUNK = 32  # verdicts asked per step of the judge stage (progress and cancel points)


def output_dir(cfg: EvalJob, home: Path) -> Path:
    return jobs.output_dir(cfg.output, home, "evals", cfg.name)


def run(cfg: EvalJob, ctx: JobContext) -> Iterator[Event]:
    started = time.perf_counter()
    combos_text = f"{len(cfg.variants)} variant(s) x RAG {'/'.join(map(_onoff, cfg.rag))}"
    yield ev.start("eval", cfg.name, f"{combos_text} on {', '.join(cfg.sets)}")
    setup = yield from validate(cfg, ctx)
    yield from plan(cfg, ctx, setup)
    replies = yield from generate(cfg, ctx, setup)
    verdicts = yield from judge(cfg, ctx, setup, replies)
    verdicts += yield from pairwise(cfg, ctx, setup, replies)
    results = yield from statistics(cfg, ctx, setup, replies, verdicts)
    paths = yield from report(ctx, setup, results)
    yield ev.done({
        "output": str(setup.out),
        "results": str(setup.out / "results.json"),
        "report_html": str(paths[1]),
        "report_md": str(paths[0]),
        "replies": len(replies),
        "generated": setup.generated,
        "judge_requests": setup.judge_requests,
        "headline": _headline(results, cfg.criteria),
        "seconds": round(time.perf_counter() - started, 1),
    })


# --- what the job works on -------------------------------------------------------------


def _onoff(rag: bool) -> str:
    return "on" if rag else "off"


@dataclass(frozen=True)
class Combo:
    variant: Variant
    rag: bool

    @property
    def id(self) -> str:
        return self.variant.name + ("+rag" if self.rag else "")

    @property
    def label(self) -> str:
        return f"{self.variant.name} · RAG {_onoff(self.rag)}"


@dataclass
class Item:
    """One thing every combination answers: a question (turns of one), a script (the user
    turns, answered in turn), or a scenario the simulator plays."""

    set: str
    id: str
    turns: list[str]
    knowledge_ids: list[str] = field(default_factory=list)
    expect: list[str] = field(default_factory=list)
    scenario: str | None = None

    @property
    def question(self) -> str:
        return self.turns[0] if self.turns else ""


@dataclass
class Setup:
    """What validation found, and the figures the stages add as they go."""

    out: Path
    persona: Any                       # Persona
    data: Any                          # PersonaData
    combos: list[Combo]
    reference: Combo
    items: list[Item]
    criteria: dict[str, list[str]]     # set -> criteria its replies are judged on
    judge_config: Any                  # JudgeConfig
    simulator: Any = None              # JudgeConfig of the simulated user, if any
    generated: int = 0
    judge_requests: int = 0

    def samples(self, cfg: EvalJob) -> range:
        return range(cfg.samples)


# --- validate --------------------------------------------------------------------------


def validate(cfg: EvalJob, ctx: JobContext) -> Generator[Event, None, Setup]:
    """Everything the user can get wrong, before any model is loaded or any call made."""
    yield ev.stage("validate", f"{len(cfg.variants)} variant(s), judge {cfg.judge}")
    from pipelines.chat import unloadable
    from pipelines.judge.runner import load_criteria
    from pipelines.judge.verdict import JudgeError

    ws = ctx.workspace
    persona = ws.persona(cfg.persona)
    data = ws.persona_data(cfg.persona)
    variants = [ws.variant(name) for name in cfg.variants]
    for variant in variants:
        why = unloadable(variant, ctx.home)
        if why:
            raise ConfigError(f"variants: {why}")
    combos = [Combo(v, rag) for v in variants for rag in cfg.rag]
    reference = next((c for c in combos if c.id == cfg.reference), combos[0])
    judge_config = ws.judge(cfg.judge)
    criteria = {
        "heldout": list(cfg.criteria),
        "probes": list(dict.fromkeys(cfg.criteria + cfg.probe_criteria)),
        "scripts": list(cfg.script_criteria),
        "simulated": list(cfg.script_criteria),
    }
    wanted = {c for s in cfg.sets for c in criteria[s]} | set(cfg.pairwise_criteria)
    try:
        load_criteria(ws, sorted(wanted))  # an unknown criterion or a broken template
    except JudgeError as exc:
        raise ConfigError(f"criteria: {exc}") from None
    unknown = sorted(set(cfg.pairwise_criteria) - set(cfg.criteria))
    if unknown:
        raise ConfigError(f"pairwise_criteria: {', '.join(unknown)} not in criteria")
    simulator = ws.judge(cfg.simulator) if cfg.simulator else None
    if any(cfg.rag):
        yield from _ensure_index(ctx, persona.id)
    items = _items(cfg, ctx, data)
    if not items:
        raise ConfigError(f"no questions: the sets {', '.join(cfg.sets)} are empty for "
                          f"persona {persona.id}")
    out = output_dir(cfg, ctx.home)
    out.mkdir(parents=True, exist_ok=True)
    return Setup(out, persona, data, combos, reference, items,
                 {s: criteria[s] for s in cfg.sets}, judge_config, simulator)


def _ensure_index(ctx: JobContext, persona: str) -> Iterator[Event]:
    """Retrieval needs the persona's facts indexed: done here, once, with the index job's
    default embedder, when they are not (what `kyara index` would do)."""
    from pipelines.chat import index_if_needed

    note = index_if_needed(ctx.store, ctx.workspace, persona, ctx.home, "rag: true")
    if note:
        yield ev.log(note)


def _items(cfg: EvalJob, ctx: JobContext, data: Any) -> list[Item]:
    items: list[Item] = []
    for name in cfg.sets:
        if name == "heldout":
            rows = _questions(cfg, ctx) if cfg.questions else data.eval
            found = [Item("heldout", q.id, [q.question], list(q.knowledge_ids),
                          list(getattr(q, "expect", []) or [])) for q in rows]
        elif name == "probes":
            found = [Item("probes", p.id, [p.question]) for p in data.probes]
        elif name == "scripts":
            found = [Item("scripts", s.id, list(s.turns)) for s in data.scripts]
        else:
            found = [Item("simulated", s.id, [s.opening], scenario=s.scenario)
                     for s in data.scenarios]
        limit = cfg.limits.get(name)
        items += found[:limit] if limit is not None else found
    return items


def _questions(cfg: EvalJob, ctx: JobContext) -> list[Any]:
    from pipelines.config import EvalQuestion, load_jsonl
    from pipelines.inference.sources import resolve_path

    path = resolve_path(cfg.questions or "", ctx.home)
    if not path.is_file() and not Path(cfg.questions or "").is_absolute():
        path = ctx.workspace.configs / (cfg.questions or "")
    if not path.is_file():
        raise ConfigError(f"questions: {cfg.questions} not found")
    return load_jsonl(path, EvalQuestion)


# --- plan ------------------------------------------------------------------------------


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


def estimate_cost(cfg: EvalJob, ctx: JobContext, setup: Setup) -> dict[str, Any]:
    """Generations, judge calls (scores and pairwise), estimated tokens and dollars: the
    prompt each criterion would send, built for a typical reply, times the calls."""
    from pipelines.judge.pairwise import build_pairwise_prompt
    from pipelines.judge.runner import Judge
    from pipelines.judge.verdict import Interaction

    judge = Judge.open(ctx.workspace, cfg.judge, setup.persona.id,
                       criteria=sorted({c for cs in setup.criteria.values() for c in cs}),
                       store=None)
    typical = "ごきげんよう。わたくし、小野寺絢音と申しますわ。"
    n_combos, n_samples = len(setup.combos), cfg.samples
    generations = sum(len(i.turns) if i.set != "simulated" else cfg.simulated_turns
                      for i in setup.items) * n_combos * n_samples
    score_calls, prompt_tokens = 0, 0
    for item in setup.items:
        turns = len(item.turns) if item.set != "simulated" else cfg.simulated_turns
        transcript = []
        for number in range(turns):
            transcript += [("user", item.turns[number] if number < len(item.turns)
                            else item.question), ("assistant", typical)]
        interaction = Interaction(tuple(transcript), item.id)
        for criterion in setup.criteria[item.set]:
            calls = n_combos * n_samples
            score_calls += calls
            prompt_tokens += calls * estimate_tokens(judge.prompt(interaction, criterion).text)
    pair_calls = 0
    others = n_combos - 1
    for item in setup.items:
        if item.set not in SINGLE_TURN:
            continue
        for criterion in cfg.pairwise_criteria:
            calls = 2 * others * n_samples
            pair_calls += calls
            text = build_pairwise_prompt(judge.criterion(criterion), setup.persona,
                                         Interaction.from_pair(item.question, ""),
                                         typical, typical)
            prompt_tokens += calls * estimate_tokens(text)
    completion_tokens = score_calls * ANSWER_TOKENS + pair_calls * CHOICE_TOKENS
    prices, pricing = setup.judge_config.prices, "live prices"
    if cfg.batch:
        from pipelines.judge.batch_api import batch_prices

        prices, source = batch_prices(setup.judge_config)
        pricing = f"Batch API prices ({source})"
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
        "samples": n_samples,
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


# --- generate --------------------------------------------------------------------------


def reply_id(cfg: EvalJob, combo: Combo, item: Item, sample: int, shape: str) -> str:
    return str(uuid.uuid5(_NAMESPACE, "\x1f".join(
        [cfg.name, combo.id, item.set, item.id, str(sample), shape])))


def _shape(cfg: EvalJob, combo: Combo, item: Item, sample: int, persona: Any) -> str:
    """A digest of everything that shapes a reply: the variant's config, retrieval, the
    persona's prompts, the generation settings and the item's turns. A change makes a new
    id, so an old reply is never taken for a new one."""
    from pipelines.judge.verdict import digest_text

    temperature = cfg.temperature if cfg.samples > 1 else 0.0
    return digest_text(combo.variant.model_dump_json(), combo.rag, persona.prompts.system,
                       persona.prompts.system_rag, cfg.max_new_tokens, temperature,
                       cfg.seed + sample, item.turns, item.scenario or "",
                       cfg.simulator or "", cfg.simulated_turns if item.set == "simulated" else 0)


def read_replies(path: Path) -> dict[str, dict[str, Any]]:
    """The replies a previous run wrote, by id; a line torn by a kill is ignored."""
    out: dict[str, dict[str, Any]] = {}
    if not path.is_file():
        return out
    for line in read_jsonl_lines(path):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "id" in row:
            out[row["id"]] = row
    return out


def _append(path: Path, row: dict[str, Any]) -> None:
    """One record at the end of a resumable log, fsynced; a line torn by a kill is ended
    first (pipelines.files.append_jsonl), so this record is kept."""
    append_jsonl(path, row)


def generate(cfg: EvalJob, ctx: JobContext, setup: Setup
             ) -> Generator[Event, None, list[dict[str, Any]]]:
    """Every combination's replies, each variant loaded once; what a previous run finished
    is kept. Returns the reply records in (combination, item, sample) order."""
    from pipelines.chat import find_retriever
    from pipelines.inference.base import BackendError
    from pipelines.inference.registry import load_backend

    path = setup.out / REPLIES
    done = {rid: r for rid, r in read_replies(path).items() if not r.get("error")}
    plan_ids = {(c.id, i.set, i.id, s): reply_id(cfg, c, i, s, _shape(cfg, c, i, s, setup.persona))
                for c in setup.combos for i in setup.items for s in setup.samples(cfg)}
    todo = [key for key, rid in plan_ids.items() if rid not in done]
    total = len(plan_ids)
    yield ev.stage("generate", f"{total} replies" + (
        f" ({total - len(todo)} kept from an earlier run)" if len(todo) < total else ""))
    retriever = find_retriever(ctx.store, setup.persona.id, ctx.home) if any(cfg.rag) else None
    simulator = _simulator(setup, ctx) if setup.simulator is not None else None
    by_variant: dict[str, list[Combo]] = {}
    for combo in setup.combos:
        by_variant.setdefault(combo.variant.name, []).append(combo)
    items = {(i.set, i.id): i for i in setup.items}
    count = total - len(todo)
    for name, combos in by_variant.items():
        mine = [key for key in todo if key[0] in {c.id for c in combos}]
        if not mine:
            continue
        yield ev.log(f"loading {name} for {len(mine)} replies")
        try:
            backend = load_backend(combos[0].variant, ctx.home)
        except BackendError as exc:
            raise ConfigError(str(exc)) from None
        batched = callable(getattr(backend, "generate_batch", None))
        steps: list[list[tuple[str, str, str, int]]] = []
        if batched:  # single-turn items in batches per combination, the rest one by one
            for combo in combos:
                single = [k for k in mine if k[0] == combo.id and k[1] in SINGLE_TURN]
                steps += [single[i:i + cfg.batch_size]
                          for i in range(0, len(single), cfg.batch_size)]
            taken = {k for step in steps for k in step}
            steps += [[k] for k in mine if k not in taken]
        else:
            steps = [[k] for k in mine]
        try:
            for step in steps:
                combo = next(c for c in combos if c.id == step[0][0])
                work = [(items[(k[1], k[2])], k[3], plan_ids[k]) for k in step]
                if batched and step[0][1] in SINGLE_TURN:
                    records = _answer_batch(cfg, setup, backend, retriever, combo, work)
                else:
                    records = [_answer(cfg, setup, backend, retriever, simulator, combo, item,
                                       sample, rid) for item, sample, rid in work]
                for record in records:
                    _append(path, record)
                    _store_reply(ctx, cfg, combo, setup.persona.id, record)
                    done[record["id"]] = record
                    setup.generated += 1
                    count += 1
                    if record.get("notice"):
                        yield ev.log(record["notice"], level="warning")
                    if record.get("error"):
                        yield ev.log(f"{combo.id} {record['set']}/{record['question_id']}: "
                                     f"{record['error']}", level="warning")
                yield ev.progress(count, total, "replies", stage="generate")
                ctx.check_cancelled()
        finally:
            backend.close()
    if simulator is not None:
        _close(simulator)
    return [done[plan_ids[key]] if plan_ids[key] in done else _missing(key, plan_ids[key])
            for key in plan_ids]


def _missing(key: tuple[str, str, str, int], rid: str) -> dict[str, Any]:
    combo, set_name, item_id, sample = key
    return {"id": rid, "combo": combo, "set": set_name, "question_id": item_id,
            "sample": sample, "text": "", "stop": "error", "error": "no reply"}


def _options(cfg: EvalJob, sample: int) -> Any:
    from pipelines.inference.base import GenerationOptions

    if cfg.samples == 1:
        return GenerationOptions(max_new_tokens=cfg.max_new_tokens, temperature=0.0, top_p=1.0,
                                 top_k=1, seed=cfg.seed)
    return GenerationOptions(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                             seed=cfg.seed + sample)


def _new_record(combo: Combo, item: Item, sample: int, rid: str) -> dict[str, Any]:
    return {"id": rid, "combo": combo.id, "variant": combo.variant.name, "rag": combo.rag,
            "set": item.set, "question_id": item.id, "sample": sample,
            "knowledge_ids": item.knowledge_ids, "expect": item.expect,
            "error": None, "tokens": 0, "seconds": 0.0, "turn_stops": []}


def _prompt(setup: Setup, combo: Combo, retriever: Any, pairs: list[tuple[str, str]],
            user: str) -> Any:
    """The chat engine's prompt for one user turn (`turn.build`: the persona's system
    prompt, with the facts retrieval finds for this turn when the combination has retrieval
    on; the history by the one rule, `turn.history`)."""
    hits = None
    if combo.rag and retriever is not None:
        hits, _ = turn.retrieve(retriever, user)
    return turn.build(setup.persona, turn.history(pairs), user, hits)


def _answer(cfg: EvalJob, setup: Setup, backend: Any, retriever: Any, simulator: Any,
            combo: Combo, item: Item, sample: int, rid: str) -> dict[str, Any]:
    """One reply record, streamed (`turn.stream`, as chat streams): the item's turns
    answered in order (a script's whole conversation, the simulated user's next turn asked
    of the simulator), the last reply measured."""
    options = _options(cfg, sample)
    pairs: list[tuple[str, str]] = []
    turns = cfg.simulated_turns if item.set == "simulated" else len(item.turns)
    record = _new_record(combo, item, sample, rid)
    started = time.perf_counter()
    text, final, rendered, hits = "", None, "", None
    for number in range(turns):
        if number < len(item.turns):
            user = item.turns[number]
        else:
            try:
                user = _ask_simulator(simulator, setup, item, turn.history(pairs, None))
            except Exception as exc:  # the simulator's failure is this reply's, one line
                record["error"] = f"simulated user: {ev.one_line(str(exc))}"
                break
        prompt = _prompt(setup, combo, retriever, pairs, user)
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
    _measure(setup, record, item, turn.history(pairs), text, final, rendered, hits,
             time.perf_counter() - started)
    return record


def _drain(stream: Any) -> Any:
    """A turn.stream run to its end: its Reply."""
    while True:
        try:
            next(stream)
        except StopIteration as done:
            return done.value


def _answer_batch(cfg: EvalJob, setup: Setup, backend: Any, retriever: Any, combo: Combo,
                  todo: Sequence[tuple[Item, int, str]]) -> list[dict[str, Any]]:
    """Single-turn replies through the backend's `generate_batch` (an hf model: several
    prompts per forward pass), one call per sample's seed. A failed batch is each of its
    replies' error. The prompts each reply was given come with its Delta."""
    from pipelines.inference.base import BackendError
    from pipelines.prompting import TemplateError

    records: list[dict[str, Any]] = []
    for sample in sorted({s for _, s, _ in todo}):
        chosen = [(item, rid) for item, s, rid in todo if s == sample]
        prompts = [_prompt(setup, combo, retriever, [], item.question) for item, _ in chosen]
        started = time.perf_counter()
        try:
            finals = backend.generate_batch([p.messages for p in prompts],
                                            _options(cfg, sample), cfg.batch_size)
            error = None
        except (BackendError, TemplateError) as exc:
            finals, error = [None] * len(chosen), exc
        seconds = (time.perf_counter() - started) / max(1, len(chosen))
        for (item, rid), prompt, final in zip(chosen, prompts, finals, strict=True):
            record = _new_record(combo, item, sample, rid)
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
            _measure(setup, record, item, history, final.text if final else "", final,
                     rendered, prompt.hits, seconds)
            records.append(record)
    return records


def _measure(setup: Setup, record: dict[str, Any], item: Item, history: list[dict[str, str]],
             text: str, final: Any, rendered: str, hits: list[Any] | None,
             seconds: float) -> None:
    """The reply's text, transcript, stop, speed, prompt and retrieval into its record,
    and its style record (pipelines.style.reply_style: the console's badges, counted by
    pipelines.evaluation.figures) and fact figure."""
    from pipelines.style import reply_style

    stop = final.stop_reason if final is not None else "error"
    record.update({
        "seconds": round(seconds, 3),
        "question": history[-2]["content"] if len(history) >= 2 else item.question,
        "transcript": history,
        "text": text if not record["error"] else "",
        "stop": stop if not record["error"] else "error",
        "tokens_per_s": final.tokens_per_s if final is not None else None,
        "rendered_prompt": rendered,
        "retrieved_ids": [h.fact_id for h in hits] if hits is not None else None,
    })
    record["style"] = reply_style(record["text"], setup.persona.speech,
                                  record["stop"]).record()  # newlines True: no line break
    record["fact_hit"] = (fact_hit(record["text"], item.expect)
                          if item.expect and not record["error"] else None)


def _loose(text: str) -> str:
    return re.sub(r"[\s・]", "", unicodedata.normalize("NFKC", text))


def fact_hit(text: str, expect: Sequence[str]) -> bool:
    """Whether a reply states the fact: one of the question's `expect` strings occurs in it,
    both NFKC-normalised without spaces and ・ (レミゼ in 「レ・ミゼ」, ４ in 「4」)."""
    reply = _loose(text)
    return any(_loose(e) in reply for e in expect if _loose(e))


def _store_reply(ctx: JobContext, cfg: EvalJob, combo: Combo, persona: str,
                 record: dict[str, Any]) -> None:
    """The reply's conversation as messages of an `eval` session (one per run and
    combination), ids derived from the reply's, so a rerun overwrites rather than adds."""
    from store.store import utcnow

    session = str(uuid.uuid5(_NAMESPACE, f"{cfg.name}\x1f{combo.id}"))
    now = utcnow()
    ctx.store.upsert("sessions", [{
        "id": session, "persona": persona, "variant": combo.variant.name, "kind": "eval",
        "title": f"eval {cfg.name} · {combo.label}", "created_at": now, "updated_at": now,
        "meta_json": json.dumps({"eval": cfg.name, "combo": combo.id, "run_id": ctx.run_id}),
    }])
    rows = []
    transcript = record.get("transcript") or []
    base_seq = uuid.UUID(record["id"]).int % 10**12 * 100  # stable across reruns
    for index, message in enumerate(transcript):
        last = (index == len(transcript) - 1 and message["role"] == "assistant"
                and not record.get("error"))
        rows.append({
            "id": record["id"] if last else f"{record['id']}:{index}",
            "session_id": session, "seq": base_seq + index, "role": message["role"],
            "content": message["content"], "status": "complete", "variant": combo.variant.name,
            "rag": combo.rag, "created_at": now,
            **({"rendered_prompt": record.get("rendered_prompt"),
                "retrieved_ids": record.get("retrieved_ids"), "stop_reason": record.get("stop"),
                "completion_tokens": record.get("tokens"),
                "tokens_per_s": record.get("tokens_per_s")} if last else {}),
        })
    if record.get("error"):
        rows.append({"id": record["id"], "session_id": session, "seq": base_seq + 99,
                     "role": "assistant", "content": "", "status": "error",
                     "variant": combo.variant.name, "rag": combo.rag, "created_at": now,
                     "error": record["error"], "stop_reason": "error"})
    if rows:
        ctx.store.upsert("messages", rows)


# --- the simulated user ----------------------------------------------------------------

SIMULATOR_PROMPT = """\
You play a user chatting with the character {name}. Stay in your role as the user, never
as {name}. Your situation: {scenario}

The conversation so far:
{conversation}

Write only your next message to {name}, in Japanese, one or two sentences, with no quotes
and no name label."""


def _simulator(setup: Setup, ctx: JobContext) -> Any:
    from pipelines.judge.providers import make_provider

    return make_provider(setup.simulator, home=ctx.home)


def _ask_simulator(provider: Any, setup: Setup, item: Item, history: list[dict[str, str]]) -> str:
    if provider is None:
        raise ConfigError("the simulated set needs simulator:")
    lines = "\n".join(f"[{'you' if m['role'] == 'user' else setup.persona.name}] {m['content']}"
                      for m in history)
    prompt = SIMULATOR_PROMPT.format(name=setup.persona.name, scenario=item.scenario or "",
                                     conversation=lines or "(nothing yet)")
    completion = asyncio.run(_complete(provider, prompt))
    text = completion.text.strip().splitlines()
    if not text or not text[0].strip():
        raise RuntimeError("the simulator answered nothing")
    return text[0].strip()


async def _complete(provider: Any, prompt: str) -> Any:
    try:
        return await provider.complete(prompt)
    finally:
        await provider.aclose()


def _close(provider: Any) -> None:
    close = getattr(provider, "close", None)
    if callable(close):
        close()


# --- judge -----------------------------------------------------------------------------


@contextmanager
def _judging(cfg: EvalJob, ctx: JobContext, setup: Setup
             ) -> Iterator[tuple[Any, asyncio.AbstractEventLoop]]:
    """A Judge on the store (every verdict written at once: flush_s 0) and the event loop
    the stage drives it with, chunk by chunk; its requests counted into the setup."""
    from pipelines.judge.runner import Judge

    wanted = sorted({c for cs in setup.criteria.values() for c in cs} | set(cfg.pairwise_criteria))
    judge_ = Judge.open(ctx.workspace, cfg.judge, setup.persona.id, criteria=wanted,
                        store=ctx.store, flush_s=0.0)
    loop = asyncio.new_event_loop()
    try:
        yield judge_, loop
    finally:
        setup.judge_requests += judge_.requests
        loop.run_until_complete(judge_.aclose())
        loop.close()


def judge(cfg: EvalJob, ctx: JobContext, setup: Setup, replies: Sequence[dict[str, Any]]
          ) -> Generator[Event, None, list[dict[str, Any]]]:
    """Every good reply on its set's criteria. A broken reply is not judged (it is missing
    in the statistics, never a score)."""
    from pipelines.judge.verdict import Interaction

    pairs = [(r, c) for r in replies if not r.get("error")
             for c in setup.criteria[r["set"]]]
    yield ev.stage("judge", f"{len(pairs)} verdicts by {setup.judge_config.model}"
                   + (" through the Batch API" if cfg.batch else ""))
    records: list[dict[str, Any]] = []
    with _judging(cfg, ctx, setup) as (judge_, loop):
        if cfg.batch:
            asks = [judge_.score_ask(Interaction.from_messages(r["transcript"], id=r["id"]), c)
                    for r, c in pairs]
            found_ = yield from _batch(cfg, ctx, setup, judge_, loop, asks, "judge")
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
                verdict = found[(reply["id"], criterion)]
                records.append(_score_record(reply, verdict))
            yield ev.progress(min(start + JUDGE_CHUNK, len(pairs)), len(pairs), "verdicts",
                              stage="judge")
            ctx.check_cancelled()
    failed = [r for r in records if r["status"] != "ok"]
    if failed:
        yield ev.log(f"{len(failed)} verdict(s) without a score (missing in the report; a "
                     f"rerun asks the failed ones again): {failed[0]['error'] or 'no score'}",
                     level="warning")
    return records


def _batch(cfg: EvalJob, ctx: JobContext, setup: Setup, judge_: Any,
           loop: asyncio.AbstractEventLoop, asks: list[Any], stage: str
           ) -> Generator[Event, None, list[Any]]:
    """A stage's verdicts through the Batch API; batch-<stage>.json in the output folder
    lets a restarted run re-attach to its batch."""
    from pipelines.judge.batch_api import judge_batch

    return (yield from judge_batch(judge_, asks, setup.out / f"batch-{stage}.json", loop=loop,
                                   poll_s=cfg.batch_poll_s, timeout_s=cfg.batch_timeout_s,
                                   stage=stage, check_cancelled=ctx.check_cancelled))


def _score_record(reply: dict[str, Any], verdict: Any) -> dict[str, Any]:
    return {"kind": "score", "reply_id": reply["id"], "combo": reply["combo"],
            "set": reply["set"], "question_id": reply["question_id"], "sample": reply["sample"],
            "criterion": verdict.criterion, "status": verdict.status, "score": verdict.score,
            "reasoning": verdict.reasoning,
            "error": verdict.error or (verdict.error_kind if verdict.status != "ok" else None)}


def pairwise(cfg: EvalJob, ctx: JobContext, setup: Setup, replies: Sequence[dict[str, Any]]
             ) -> Generator[Event, None, list[dict[str, Any]]]:
    """Each combination against the reference on the single-turn sets, asked twice with
    the positions swapped; orders that disagree are a tie."""
    from pipelines.judge.pairwise import choice_of, outcome
    from pipelines.judge.verdict import Interaction

    if not cfg.pairwise_criteria or len(setup.combos) < 2:
        return []
    reference = {(r["set"], r["question_id"], r["sample"]): r for r in replies
                 if r["combo"] == setup.reference.id}
    jobs_: list[tuple[dict[str, Any], dict[str, Any], str]] = []
    for reply in replies:
        if reply["combo"] == setup.reference.id or reply["set"] not in SINGLE_TURN:
            continue
        ref = reference.get((reply["set"], reply["question_id"], reply["sample"]))
        for criterion in cfg.pairwise_criteria:
            jobs_.append((reply, ref, criterion))
    yield ev.stage("pairwise", f"{len(jobs_)} comparisons with {setup.reference.id}, "
                   "both orders")
    records: list[dict[str, Any]] = []

    async def both(reply: dict[str, Any], ref: dict[str, Any], criterion: str) -> dict[str, Any]:
        conversation = Interaction.from_pair(reply["question"], "")
        first, second = await asyncio.gather(
            judge_.prefer(conversation, reply["text"], ref["text"], criterion,
                          message_id=reply["id"]),
            judge_.prefer(conversation, ref["text"], reply["text"], criterion,
                          message_id=reply["id"]))
        return record(reply, ref, criterion, first, second)

    def both_there(job: tuple[dict[str, Any], Any, str]) -> bool:
        reply, ref, _ = job
        return ref is not None and not ref.get("error") and not reply.get("error")

    def orders(reply: dict[str, Any], ref: dict[str, Any], criterion: str) -> list[Any]:
        conversation = Interaction.from_pair(reply["question"], "")
        return [judge_.prefer_ask(conversation, reply["text"], ref["text"], criterion,
                                  message_id=reply["id"]),
                judge_.prefer_ask(conversation, ref["text"], reply["text"], criterion,
                                  message_id=reply["id"])]

    def record(reply: dict[str, Any], ref: dict[str, Any], criterion: str, first: Any,
               second: Any) -> dict[str, Any]:
        a, b = choice_of(first), choice_of(second)
        return {"kind": "pairwise", "combo": reply["combo"], "reference": ref["combo"],
                "set": reply["set"], "question_id": reply["question_id"],
                "sample": reply["sample"], "criterion": criterion, "first": a, "second": b,
                "outcome": outcome(a, b),
                "error": next((v.error or v.error_kind for v in (first, second)
                               if v.status != "ok"), None)}

    with _judging(cfg, ctx, setup) as (judge_, loop):
        if cfg.batch:
            ready = [i for i, job in enumerate(jobs_) if both_there(job)]
            asks = [a for i in ready for a in orders(*jobs_[i])]
            found_ = yield from _batch(cfg, ctx, setup, judge_, loop, asks, "pairwise")
            batched = {i: record(*jobs_[i], found_[2 * n], found_[2 * n + 1])
                       for n, i in enumerate(ready)}
        for start in range(0, len(jobs_), JUDGE_CHUNK):
            chunk = jobs_[start:start + JUDGE_CHUNK]
            for reply, ref, criterion in chunk:
                if not both_there((reply, ref, criterion)):
                    records.append({"kind": "pairwise", "combo": reply["combo"],
                                    "reference": setup.reference.id, "set": reply["set"],
                                    "question_id": reply["question_id"],
                                    "sample": reply["sample"], "criterion": criterion,
                                    "first": None, "second": None, "outcome": None,
                                    "error": "a reply is missing"})
            if cfg.batch:
                records += [batched[i] for i in range(start, start + len(chunk)) if i in batched]
            else:
                records += loop.run_until_complete(_gather([both(*job) for job in chunk
                                                            if both_there(job)]))
            loop.run_until_complete(judge_.flush())
            yield ev.progress(min(start + JUDGE_CHUNK, len(jobs_)), len(jobs_), "comparisons",
                              stage="pairwise")
            ctx.check_cancelled()
    return records


async def _gather(tasks: list[Any]) -> list[Any]:
    return list(await asyncio.gather(*tasks))


# --- results and report ----------------------------------------------------------------


def statistics(cfg: EvalJob, ctx: JobContext, setup: Setup, replies: Sequence[dict[str, Any]],
               verdicts: Sequence[dict[str, Any]]) -> Generator[Event, None, dict[str, Any]]:
    from pipelines.evaluation.results import build_results, write_results
    from pipelines.judge.runner import Judge

    yield ev.stage("results", "means, paired differences and intervals")
    write_jsonl(setup.out / VERDICTS, verdicts)
    judge_ = Judge.open(ctx.workspace, cfg.judge, setup.persona.id,
                        criteria=sorted({c for cs in setup.criteria.values() for c in cs}),
                        store=None)
    criteria = []
    for name in dict.fromkeys(c for s in cfg.sets for c in setup.criteria[s]):
        status = judge_.calibration(name)
        label = f"calibrated {status.label}" if status.state == "calibrated" else status.label
        criteria.append({"name": name, "title": judge_.criterion(name).title,
                         "calibration": label})
    meta = {"name": cfg.name, "persona": setup.persona.id,
            "judge": {"name": setup.judge_config.name, "model": setup.judge_config.model},
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "reference": setup.reference.id, "seed": cfg.seed, "samples": cfg.samples}
    combos = [{"id": c.id, "variant": c.variant.name, "rag": c.rag, "label": c.label}
              for c in setup.combos]
    results = build_results(meta, combos, criteria, list(replies), list(verdicts),
                            seed=cfg.seed)
    results["arena"] = _arena(ctx, setup, cfg.seed)
    write_results(results, setup.out)
    return results


def _arena(ctx: JobContext, setup: Setup, seed: int) -> dict[str, Any]:
    """Bradley–Terry ratings of the variants from this run's pairwise verdicts (the judge)
    and from every human vote in the store (blind A/B), and how alike they order them."""
    from dataclasses import asdict

    from pipelines.evaluation.arena import agreement, arena

    judge_ = arena(ctx.store, "judge", eval_dirs=[setup.out], seed=seed)
    human = arena(ctx.store, "human", seed=seed)
    return {"judge": judge_.to_dict(), "human": human.to_dict(),
            "agreement": asdict(agreement(judge_, human))}


def report(ctx: JobContext, setup: Setup, results: dict[str, Any]
           ) -> Generator[Event, None, tuple[Path, Path]]:
    from pipelines.evaluation.report import write_report

    yield ev.stage("report", str(setup.out))
    md, html = write_report(results, setup.out)
    yield ev.log(f"report: {html}")
    return md, html


def _headline(results: dict[str, Any], criteria: Sequence[str]) -> list[dict[str, Any]]:
    """The done event's short form: each combination's mean per criterion."""
    out = []
    for row in results.get("headline", []):
        out.append({"combo": row["combo"], **{
            c: (row["criteria"].get(c) or {}).get("mean") for c in criteria}})
    return out
