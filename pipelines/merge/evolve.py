"""Evolutionary merging: CMA-ES over merge parameters, each candidate merged in memory into
one resident model and scored by its replies.

- Genome -> mergekit configuration (`SearchSpace.decode`): per-model weights, and densities
  for ties / dare_ties, optionally one value per layer group (a mergekit gradient list).
  Values are clipped into their bounds and rounded, and the rounded configuration is the
  one evaluated, stored and written out: what was scored is what mergekit would merge.
- Fitness (`Evaluator`): replies to the held-out questions generated on the resident model
  (pipelines.evaluation, batched; persona system prompt, folded where the template has no system role), scored
  by the persona judge over its API (mean per criterion, G-Eval weighted where logprobs
  exist), the deterministic style checks and an optional capability check. A failed
  verdict is left out of the means, never counted as 0; when fewer than `min_judged` of
  the verdicts are ok the evaluation fails (fitness None) and CMA-ES is told `penalty`.
- Every evaluation is one JSON line of `evaluations.jsonl` (appended, fsync-ed). A rerun of
  the same search replays the stored lines into CMA-ES: with the same seed, ask/tell give
  the same candidates, so finished evaluations are told again, never recomputed.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.config import ConfigError, EvolveJob, iter_jsonl
from pipelines.files import append_jsonl, drop_torn_tail, jsonl_lines, write_json
from pipelines.plan.model import resolve_model_dir, safetensors_header

EVALUATIONS_FILE = "evaluations.jsonl"
SEARCH_FILE = "search.json"
BEST_FILE = "best_merge.yaml"
DENSITY_METHODS = frozenset({"ties", "dare_ties"})
BASE_METHODS = frozenset({"task_arithmetic", "ties", "dare_ties"})
DIGITS = 4  # parameters are rounded: the stored YAML is exactly what was evaluated

_TORCH_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


# --- the search space -----------------------------------------------------------------


@dataclass
class Variable:
    name: str       # e.g. "weight[1].g0"
    model: int      # index into SearchSpace.inputs
    kind: str       # weight | density
    group: int
    low: float
    high: float
    start: float


@dataclass
class SearchSpace:
    method: str
    base: str | None                  # resolved folder of the base model
    inputs: list[str]                 # resolved folders of the weighted models
    groups: int
    out_dtype: str
    variables: list[Variable] = field(default_factory=list)

    @classmethod
    def build(cls, cfg: EvolveJob, base: str | None, inputs: list[str], out_dtype: str
              ) -> SearchSpace:
        space = cls(cfg.method, base, inputs, cfg.layer_groups, out_dtype)
        linear = cfg.method == "linear"
        for m in range(len(inputs)):
            for g in range(cfg.layer_groups):
                # linear normalises by the sum of weights: keep it away from zero
                space.variables.append(Variable(f"weight[{m}].g{g}", m, "weight", g,
                                                0.01 if linear else 0.0, 1.0, 0.5))
            if cfg.method in DENSITY_METHODS:
                for g in range(cfg.layer_groups):
                    space.variables.append(Variable(f"density[{m}].g{g}", m, "density", g,
                                                    0.1, 1.0, 0.7))
        return space

    @property
    def x0(self) -> list[float]:
        return [v.start for v in self.variables]

    def decode(self, x: Sequence[float]) -> dict[str, Any]:
        """A plain mergekit configuration (a dict that MergeConfiguration validates)."""
        values: dict[tuple[int, str], list[float]] = {}
        for var, raw in zip(self.variables, x, strict=True):
            value = round(min(var.high, max(var.low, float(raw))), DIGITS)
            values.setdefault((var.model, var.kind), []).append(value)
        models = []
        for m, folder in enumerate(self.inputs):
            params: dict[str, Any] = {}
            for kind in ("weight", "density"):
                got = values.get((m, kind))
                if got is not None:
                    params[kind] = got[0] if self.groups == 1 else got
            models.append({"model": folder, "parameters": params})
        config: dict[str, Any] = {"merge_method": self.method}
        if self.base is not None:
            config["base_model"] = self.base
        config["models"] = models
        config["dtype"] = "float32"          # the per-tensor accumulator
        config["out_dtype"] = self.out_dtype  # the resident model's dtype
        return config


def resolve_sources(cfg: EvolveJob, home: Path | None) -> tuple[str | None, list[str]]:
    """(base folder or None, weighted model folders), each a resolved local folder; a
    one-line ConfigError for a model that is not there or a method that needs a base."""
    if cfg.method in BASE_METHODS and cfg.base_model is None:
        raise ConfigError(f"base_model: method {cfg.method} needs a base model (task "
                          "vectors are differences from it)")
    folders = [str(resolve_model_dir(m, home).resolve()) for m in cfg.models]
    if len(set(folders)) != len(folders):
        raise ConfigError("models: the same model is named twice")
    base = str(resolve_model_dir(cfg.base_model, home).resolve()) if cfg.base_model else None
    if base is not None and base in folders:
        raise ConfigError(f"models: '{cfg.base_model}' is the base model; list only the "
                          "models merged onto it")
    if cfg.method == "linear" and base is not None:
        folders = [base, *folders]  # linear has no base: it is one more weighted model
        base = None
    return base, folders


def stored_dtype(folder: str) -> str:
    """The torch dtype name of a model's floating tensors (its first one)."""
    for file in sorted(Path(folder).glob("*.safetensors")):
        for name, info in safetensors_header(file).items():
            if name != "__metadata__" and info["dtype"] in _TORCH_DTYPES:
                return _TORCH_DTYPES[info["dtype"]]
    return "float32"


def fingerprint(cfg: EvolveJob, space: SearchSpace) -> dict[str, Any]:
    """What makes two runs the same search: a rerun with another of these is refused."""
    keys = ("method", "persona", "judge", "criteria", "questions", "questions_limit",
            "population", "sigma", "seed", "layer_groups", "max_new_tokens", "temperature",
            "fitness", "capability", "min_judged", "penalty")
    data = cfg.model_dump(mode="json")
    out = {k: data[k] for k in keys}
    out["base"] = space.base
    out["inputs"] = space.inputs
    out["variables"] = [v.name for v in space.variables]
    return out


# --- the evaluation log ---------------------------------------------------------------


class EvaluationLog:
    """evaluations.jsonl: one complete JSON line per finished evaluation, appended with
    one write and an fsync. A line cut short by a kill is dropped (and cut off the file)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.path = folder / EVALUATIONS_FILE

    def check_search(self, data: dict[str, Any]) -> None:
        path = self.folder / SEARCH_FILE
        self.folder.mkdir(parents=True, exist_ok=True)
        if path.is_file():
            old = json.loads(path.read_text(encoding="utf-8"))
            if old != data:
                changed = sorted(k for k in set(old) | set(data) if old.get(k) != data.get(k))
                raise ConfigError(f"output: {self.folder} holds another search (changed: "
                                  f"{', '.join(changed)}); choose another output or remove it")
            return
        write_json(path, data)

    def load(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        # a torn last line is cut off: the evaluation it held is done again
        raw = drop_torn_tail(self.path)
        records = []
        for number, line in enumerate(jsonl_lines(raw), start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    raise ConfigError(f"{self.path}:{number}: not JSON; the search cannot "
                                      "resume from it") from None
        for i, record in enumerate(records):
            if record.get("index") != i:
                raise ConfigError(f"{self.path}: line {i + 1} is evaluation "
                                  f"{record.get('index')}, expected {i}")
        return records

    def append(self, record: dict[str, Any]) -> None:
        append_jsonl(self.path, record)


# --- fitness --------------------------------------------------------------------------


@dataclass
class Question:
    id: str
    text: str
    expected: tuple[str, ...] = ()


def load_questions(cfg: EvolveJob, workspace: Any) -> list[Question]:
    if cfg.questions:
        path = Path(os.path.expandvars(cfg.questions)).expanduser()
        out = []
        for number, where, row in iter_jsonl(path):
            if not isinstance(row, dict) or not isinstance(row.get("question"), str):
                raise ConfigError(f"{where}: expected an object with 'question'")
            out.append(Question(str(row.get("id", f"q{number}")), row["question"]))
    else:
        out = [Question(q.id, q.question) for q in workspace.persona_data(cfg.persona).eval]
    if not out:
        raise ConfigError("questions: no held-out questions (the persona's eval.jsonl is empty)")
    return out[: cfg.questions_limit] if cfg.questions_limit else out


def load_capability(path_text: str) -> list[Question]:
    path = Path(os.path.expandvars(path_text)).expanduser()
    out = []
    for number, where, row in iter_jsonl(path):
        expected = row.get("expected") if isinstance(row, dict) else None
        if isinstance(expected, str):
            expected = [expected]
        if (not isinstance(row, dict) or not isinstance(row.get("question"), str)
                or not isinstance(expected, list) or not expected):
            raise ConfigError(f"{where}: expected {{\"question\": ..., \"expected\": "
                              "[substrings]}")
        out.append(Question(str(row.get("id", f"c{number}")), row["question"],
                            tuple(str(e) for e in expected)))
    if not out:
        raise ConfigError(f"capability: {path} has no questions")
    return out


def fitness_of(cfg: EvolveJob, judge_means: dict[str, float] | None, style: float | None,
               capability: float | None) -> float:
    """Weighted mean of the terms present, each in 0..1 (judge scores 1..7 scaled)."""
    terms: list[tuple[float, float]] = []
    if judge_means is not None and cfg.fitness.judge > 0:
        judge = statistics.fmean((m - 1) / 6 for m in judge_means.values())
        terms.append((cfg.fitness.judge, judge))
    if style is not None and cfg.fitness.style > 0:
        terms.append((cfg.fitness.style, style))
    if capability is not None and cfg.fitness.capability > 0:
        terms.append((cfg.fitness.capability, capability))
    total = sum(w for w, _ in terms)
    return sum(w * v for w, v in terms) / total if total else 0.0


class Evaluator:
    """The resident model, its tokenizer, the judge: evaluates one candidate at a time.

    Built once per job (per Ray actor): the model is loaded once and only overwritten."""

    def __init__(self, cfg: EvolveJob, workspace: Any, space: SearchSpace,
                 judge: Any = None) -> None:
        import torch
        from transformers import AutoTokenizer

        from pipelines.inference.loading import load_causal_lm
        from pipelines.merge.inmemory import InMemoryMerger, SourceIndex, check_compatible

        self.cfg = cfg
        self.space = space
        self.device = cfg.options.device
        folders = ([space.base] if space.base else []) + space.inputs
        indexes = {f: SourceIndex(f) for f in folders}
        check_compatible(indexes)
        donor = folders[0]
        dtype = getattr(torch, space.out_dtype)
        # The one resident model, loaded from the base (or first) model; every candidate
        # overwrites all of its tensors. On a GPU it is loaded there directly (device_map),
        # never staged whole in host RAM.
        # The loader chat uses (eager attention for Gemma): the fitness is measured on the
        # model a merged variant is then served as.
        self.model = load_causal_lm(donor, dtype=dtype, device_map={"": self.device}
                                    if self.device != "cpu" else None)
        self.model.eval()
        self.merger = InMemoryMerger(self.model, indexes, device=self.device)
        tok_dir = next((f for f in folders if (Path(f) / "tokenizer_config.json").is_file()),
                       None)
        if tok_dir is None:
            raise ConfigError("models: none of the models has a tokenizer "
                              "(tokenizer_config.json); replies cannot be generated")
        self.tokenizer = AutoTokenizer.from_pretrained(tok_dir)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.template = self._template()
        from pipelines.evaluation import end_of_generation_ids

        self.eos_ids = list(end_of_generation_ids(self.model, self.tokenizer))
        data = workspace.persona_data(cfg.persona)
        self.rules = data.persona.speech
        from pipelines.prompting import system_prompt

        self.system = system_prompt(data.persona)
        self.questions = load_questions(cfg, workspace)
        self.capability = load_capability(cfg.capability) if cfg.capability else []
        self.judge = judge
        if self.judge is None and cfg.fitness.judge > 0:
            from pipelines.judge import Judge

            self.judge = Judge.open(workspace, cfg.judge, cfg.persona, criteria=cfg.criteria,
                                    store=None)
        self.criteria = list(cfg.criteria)
        # One loop for the whole job: the judge's HTTP client stays bound to it.
        self.loop = asyncio.new_event_loop()

    def _template(self) -> str:
        from pipelines.prompting import GEMMA_TEMPLATE

        template = self.tokenizer.chat_template
        if isinstance(template, dict):
            template = template.get("default")
        if template:
            return template
        if str(getattr(self.model.config, "model_type", "")).startswith("gemma"):
            return GEMMA_TEMPLATE
        raise ConfigError("models: the tokenizer has no chat template")

    # --- generation -------------------------------------------------------------------

    def generate(self, questions: Sequence[Question]) -> list[Any]:
        """One evaluation.Reply per question (text stripped; stop eos|length) from the
        resident model: pipelines.evaluation's batched generation with this job's batch
        size, tokens and temperature (greedy at 0), the persona system prompt folded where
        the template has no system role."""
        from pipelines.evaluation import generate

        replies = generate(self.model, self.tokenizer, [q.text for q in questions],
                           template=self.template, system=self.system,
                           max_new_tokens=self.cfg.max_new_tokens,
                           batch_size=self.cfg.batch_size, temperature=self.cfg.temperature,
                           end_ids=self.eos_ids)
        for reply in replies:
            reply.text = reply.text.strip()
        return replies

    # --- one evaluation ---------------------------------------------------------------

    def evaluate(self, merge: dict[str, Any], seed: int) -> dict[str, Any]:
        """Merge `merge` into the resident model, generate, score. The record's fields
        besides index / generation / genome."""
        import torch

        from pipelines.evaluation import figures
        from pipelines.merge.merge import validate_merge_config

        started = time.perf_counter()
        torch.manual_seed(seed)  # dare's random masks, and sampling when configured
        self.merger.apply(validate_merge_config(merge, "merge"))
        replies = self.generate(self.questions)
        style = figures("candidate", replies, self.rules).style
        capability = None
        if self.capability:
            answers = self.generate(self.capability)
            capability = statistics.fmean(
                any(e.lower() in a.text.lower() for e in q.expected)
                for q, a in zip(self.capability, answers, strict=True))
        record: dict[str, Any] = {"seed": seed, "merge": merge}
        judge_means: dict[str, float] | None = None
        status, error = "ok", None
        counts = {"ok": 0, "invalid": 0, "failed": 0}
        if self.judge is not None:
            judge_means, counts, error = self._judge(replies)
            if error is not None:
                status = "failed"
        record.update({
            "status": status,
            "fitness": fitness_of(self.cfg, judge_means, style, capability)
            if status == "ok" else None,
            "error": error,
            "terms": {"judge": None if judge_means is None else round(
                statistics.fmean((m - 1) / 6 for m in judge_means.values()), 6),
                "style": round(style, 6),
                "capability": None if capability is None else round(capability, 6)},
            "criteria": judge_means or {},
            "verdicts": counts,
            "samples": [{"id": q.id, "question": q.text, "reply": r.text, "stop": r.stop}
                        for q, r in list(zip(self.questions, replies,
                                             strict=True))[: self.cfg.samples]],
            "seconds": round(time.perf_counter() - started, 3),
        })
        return record

    def _judge(self, replies: list[Any]
               ) -> tuple[dict[str, float] | None, dict[str, int], str | None]:
        from pipelines.judge import Interaction

        interactions = [Interaction.from_pair(q.text, r.text, id=q.id)
                        for q, r in zip(self.questions, replies, strict=True)]
        results = self.loop.run_until_complete(
            self.judge.score_items(interactions, self.criteria))
        counts = {"ok": 0, "invalid": 0, "failed": 0}
        scores: dict[str, list[float]] = {c: [] for c in self.criteria}
        kinds: dict[str, int] = {}
        for (_, criterion), verdict in results.items():
            counts[verdict.status] = counts.get(verdict.status, 0) + 1
            if verdict.status == "ok" and verdict.score is not None:
                value = (verdict.weighted_score if verdict.weighted_score is not None
                         else verdict.score)
                scores[criterion].append(float(value))
            else:
                kind = verdict.error_kind or verdict.status
                kinds[kind] = kinds.get(kind, 0) + 1
        total = sum(counts.values())
        empty = [c for c, s in scores.items() if not s]
        if total == 0 or counts["ok"] / total < self.cfg.min_judged or empty:
            detail = ", ".join(f"{k} x{n}" for k, n in sorted(kinds.items()))
            return None, counts, (f"{total - counts['ok']} of {total} verdicts not ok "
                                  f"({detail})")
        return {c: round(statistics.fmean(s), 6) for c, s in scores.items()}, counts, None

    def close(self) -> None:
        if self.judge is not None:
            try:
                self.loop.run_until_complete(self.judge.aclose())
            except Exception:  # closing the HTTP client; the results are already stored
                pass
        self.loop.close()
        self.merger.close()


# --- the search -----------------------------------------------------------------------


def candidate_seed(cfg: EvolveJob, index: int) -> int:
    return (cfg.seed * 1_000_003 + index) % (2**31 - 1)


def new_strategy(cfg: EvolveJob, space: SearchSpace) -> Any:
    """CMA-ES with its own generator (not numpy's global one): the same seed gives the same
    candidates whatever else the process draws."""
    import numpy as np

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # cma: "could not import matplotlib"
        import cma

    rng = np.random.RandomState(cfg.seed)
    return cma.CMAEvolutionStrategy(space.x0, cfg.sigma, {
        "popsize": cfg.population,
        "randn": lambda *size: rng.standard_normal(size),
        "verbose": -9,
        "seed": np.nan,  # unused with our randn; says so instead of warning
    })


Evaluate = Callable[[list[tuple[int, dict[str, Any], int]]],
                    Iterator[tuple[int, dict[str, Any]]]]


@dataclass
class SearchResult:
    records: list[dict[str, Any]]
    replayed: int
    evaluated: int

    @property
    def best(self) -> dict[str, Any] | None:
        ok = [r for r in self.records if r["status"] == "ok"]
        return max(ok, key=lambda r: (r["fitness"], -r["index"])) if ok else None


def search(cfg: EvolveJob, space: SearchSpace, log: EvaluationLog, evaluate: Evaluate,
           result: SearchResult, check_cancelled: Callable[[], None] = lambda: None
           ) -> Iterator[Any]:
    """The CMA-ES loop as events. `evaluate(batch)` takes [(index, merge config, seed)]
    and yields (index, record) in order; records are appended to `log` as they come."""
    import numpy as np

    from pipelines import events as ev

    stored = log.load()
    total = cfg.population * cfg.generations
    if len(stored) > total:
        raise ConfigError(f"{log.path}: {len(stored)} evaluations stored but the search has "
                          f"only {total}; raise generations or choose another output")
    es = new_strategy(cfg, space)
    best: float | None = None
    if stored:
        yield ev.log(f"resuming: {len(stored)} of {total} evaluations stored in {log.path}")
    for generation in range(cfg.generations):
        asked = es.ask()
        records: list[dict[str, Any] | None] = [None] * len(asked)
        todo = []
        for i, x in enumerate(asked):
            index = generation * cfg.population + i
            genome = [float(v) for v in x]
            if index < len(stored):
                record = stored[index]
                if not np.allclose(record["genome"], genome, rtol=0, atol=1e-9):
                    raise ConfigError(f"{log.path}: evaluation {index} was made by another "
                                      "search (its genome differs); choose another output")
                records[i] = record
                result.replayed += 1
            else:
                todo.append((index, space.decode(genome), candidate_seed(cfg, index), genome))
        for record in records:
            if record is not None:
                best = yield from _report(record, best, total, replayed=True)
        if todo:
            yield ev.stage("evaluate", f"generation {generation + 1} of {cfg.generations}: "
                                       f"{len(todo)} candidate(s)")
        genomes = {index: genome for index, _, _, genome in todo}
        for index, fields in evaluate([(i, m, s) for i, m, s, _ in todo]):
            record = {"index": index, "generation": generation, "genome": genomes[index],
                      **fields}
            log.append(record)
            records[index - generation * cfg.population] = record
            result.evaluated += 1
            best = yield from _report(record, best, total, replayed=False)
            check_cancelled()
        values = []
        for record in records:
            assert record is not None
            ok = record["status"] == "ok" and record["fitness"] is not None
            values.append(-float(record["fitness"]) if ok else -float(cfg.penalty))
        es.tell(asked, values)  # cma minimises
        result.records.extend(r for r in records if r is not None)
        check_cancelled()


def _report(record: dict[str, Any], best: float | None, total: int, *, replayed: bool
            ) -> Iterator[Any]:
    from pipelines import events as ev

    index = record["index"]
    if record["status"] == "ok":
        fitness = float(record["fitness"])
        best = fitness if best is None else max(best, fitness)
        yield ev.metric("fitness", fitness, step=index, stage="evaluate")
        for name, value in (record.get("criteria") or {}).items():
            yield ev.metric(f"judge_{name}", value, step=index, stage="evaluate")
    if best is not None:
        yield ev.metric("best_fitness", best, step=index, stage="evaluate")
    if not replayed:
        sample = (record.get("samples") or [{}])[0].get("reply", "")
        summary = (f"fitness {record['fitness']:.4f}" if record["status"] == "ok"
                   else f"failed: {record['error']}")
        yield ev.log(f"evaluation {index}: {summary} ({record['seconds']:.1f} s); "
                     f"e.g. {sample[:60]!r}",
                     level="info" if record["status"] == "ok" else "warning")
    yield ev.progress(index + 1, total, "evaluations", stage="evaluate")
    return best


def sequential(evaluator: Evaluator) -> Evaluate:
    def run(batch: list[tuple[int, dict[str, Any], int]]
            ) -> Iterator[tuple[int, dict[str, Any]]]:
        for index, merge, seed in batch:
            yield index, evaluator.evaluate(merge, seed)

    return run


