"""The eval job's set-up: what it works on (combinations, items), the validation of
everything the user can get wrong before any model is loaded or any call made, and the
two things every later stage shares, opened once per run here: the judge (with the event
loop the stages drive it with) and the persona's retriever."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines import events as ev
from pipelines import jobs
from pipelines.chat import unloadable
from pipelines.config import ConfigError, EvalJob, EvalQuestion, Variant, load_jsonl
from pipelines.events import Event
from pipelines.inference.sources import resolve_path
from pipelines.jobs import JobContext
from pipelines.judge.runner import Judge, load_criteria
from pipelines.judge.verdict import JudgeError
from pipelines.retrieval.opening import open_retriever

REPLIES = "replies.jsonl"
VERDICTS = "verdicts.jsonl"
PLAN = "plan.json"
NAMESPACE = uuid.UUID("0d6f3c52-9a7e-4c1b-8f0e-5b2a7c9e1d43")
SINGLE_TURN = ("heldout", "probes")   # the sets compared pairwise (one question, one reply)


def output_dir(cfg: EvalJob, home: Path) -> Path:
    return jobs.output_dir(cfg.output, home, "evals", cfg.name)


def onoff(rag: bool) -> str:
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
        return f"{self.variant.name} · RAG {onoff(self.rag)}"


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
    """What validation found, what every stage shares (the judge and its event loop, the
    retriever: each opened once per run), and the figures the stages add as they go."""

    out: Path
    persona: Any                       # Persona
    data: Any                          # PersonaData
    combos: list[Combo]
    reference: Combo
    items: list[Item]
    criteria: dict[str, list[str]]     # set -> criteria its replies are judged on
    judge_config: Any                  # JudgeConfig
    simulator: Any = None              # JudgeConfig of the simulated user, if any
    judge: Any = None                  # pipelines.judge.Judge on the store, every criterion
    loop: asyncio.AbstractEventLoop | None = None  # the loop the judge runs on
    retriever: Any = None              # pipelines.retrieval.Retriever when rag is on
    generated: int = 0
    judge_requests: int = 0

    def samples(self, cfg: EvalJob) -> range:
        return range(cfg.samples)

    def score_criteria(self) -> list[str]:
        """Every criterion some set's replies are scored on, sorted."""
        return sorted({c for cs in self.criteria.values() for c in cs})

    def count_requests(self) -> None:
        if self.judge is not None:
            self.judge_requests = self.judge.requests

    def close(self) -> None:
        """The judge's verdicts flushed and its provider closed, then its loop."""
        judge, loop = self.judge, self.loop
        self.judge, self.loop = None, None
        if loop is None:
            return
        try:
            if judge is not None:
                loop.run_until_complete(judge.aclose())
        finally:
            loop.close()


def validate(cfg: EvalJob, ctx: JobContext) -> Generator[Event, None, Setup]:
    """Everything the user can get wrong, before any model is loaded or any call made;
    then the retriever (the persona indexed first if need be) and the judge, opened once."""
    yield ev.stage("validate", f"{len(cfg.variants)} variant(s), judge {cfg.judge}")
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
    retriever = None
    if any(cfg.rag) and not data.knowledge:  # "RAG on" would be RAG off under another name
        raise ConfigError(f"rag: retrieval on needs facts, and persona {persona.id}'s "
                          "knowledge.jsonl holds none (add facts, or rag: [false])")
    if any(cfg.rag):  # retrieval needs the persona's facts indexed: done once, if not yet
        retriever, note = open_retriever(ctx.store, persona.id, ctx.home, workspace=ws,
                                         needed_by="rag: true")
        if note:
            yield ev.log(note)
    items = _items(cfg, ctx, data)
    if not items:
        raise ConfigError(f"no questions: the sets {', '.join(cfg.sets)} are empty for "
                          f"persona {persona.id}")
    out = output_dir(cfg, ctx.home)
    out.mkdir(parents=True, exist_ok=True)
    setup = Setup(out, persona, data, combos, reference, items,
                  {s: criteria[s] for s in cfg.sets}, judge_config, simulator,
                  retriever=retriever)
    _open_judge(cfg, ctx, setup)
    return setup


def _open_judge(cfg: EvalJob, ctx: JobContext, setup: Setup) -> None:
    """The run's one Judge: on the store (every verdict written at once: flush_s 0), with
    every criterion the plan, the judge and pairwise stages and the results ask about,
    and the event loop the stages drive it with, chunk by chunk."""
    wanted = sorted(set(setup.score_criteria()) | set(cfg.pairwise_criteria))
    setup.judge = Judge.open(ctx.workspace, cfg.judge, setup.persona.id, criteria=wanted,
                             store=ctx.store, flush_s=0.0)
    setup.loop = asyncio.new_event_loop()


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
    path = resolve_path(cfg.questions or "", ctx.home)
    if not path.is_file() and not Path(cfg.questions or "").is_absolute():
        path = ctx.workspace.configs / (cfg.questions or "")
    if not path.is_file():
        raise ConfigError(f"questions: {cfg.questions} not found")
    return load_jsonl(path, EvalQuestion)
