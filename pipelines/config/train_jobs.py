"""The train and prefer jobs: a LoRA adapter of an hf variant, trained by SFT or by
preference (DPO / KTO / ORPO). What both take is declared once, in `AdapterJob`."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from pipelines.config.base import DEFAULT_PERSONA, Name, Strict


class LoraSettings(Strict):
    r: int = Field(16, gt=0, description="the adapter's rank")
    alpha: int = Field(32, gt=0, description="LoRA scaling numerator (scale = alpha / r)")
    dropout: float = Field(0.05, ge=0, lt=1, description="dropout on the adapter's input")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="module names the adapter wraps, or every linear layer")


def fsdp_sharded(job: Any) -> bool:
    """A train or prefer job that shards its model across processes: `distributed: fsdp`
    with `processes` > 1 (with one process the setting does nothing)."""
    return getattr(job, "processes", 1) > 1 and getattr(job, "distributed", "ddp") == "fsdp"


def _check_processes(job: Any) -> None:
    """batch_size is the global batch of one step: each of `processes` takes an equal share.
    FSDP does not shard 4-bit weights (Accelerate leaves bitsandbytes' uint8 storage whole
    on every GPU), so qlora with fsdp would save nothing over DDP: refused."""
    if job.batch_size % job.processes:
        raise ValueError(f"batch_size: {job.batch_size} does not split evenly among "
                         f"{job.processes} processes (each takes batch_size / processes)")
    if job.qlora and fsdp_sharded(job):
        raise ValueError("qlora with distributed: fsdp: FSDP leaves the 4-bit weights whole "
                         "on every GPU; use distributed: ddp (or qlora: false to shard)")


class AdapterJob(Strict):
    """What the train and prefer jobs both take, with the same meaning and default. Each
    job declares `job`, `base`, `data`, `judge` and its own step defaults (epochs, learning
    rate, batch and sequence sizes, eval share, checkpoint interval)."""

    job: str = Field(description="the job kind")
    name: Name = Field(description="the run's name: its folder and, by default, the variant's")
    persona: str = Field(DEFAULT_PERSONA, description="whose prompts and data")
    base: str = Field(description="model variant name (hf backend) to train")
    output: str | None = Field(None, description="the run's folder; default <home>/runs/<name>")
    lora: LoraSettings = Field(LoraSettings(), description="the adapter's shape")
    qlora: bool = Field(False, description="load the base in 4 bits (bitsandbytes, CUDA)")
    max_steps: int = Field(-1, description="stop after this many steps; -1: epochs decide")
    grad_accum: int = Field(1, gt=0, description="steps whose gradients are summed per "
                            "optimizer update")
    seed: int = Field(0, description="data split, shuffling and initialisation")
    variant: Name | None = Field(None,
                                description="name of the trained variant; default: the job name")
    dequantize_from: str | None = Field(
        None, description="a gguf variant (embedded) whose file is dequantised into the base "
                          "variant's model directory when that directory does not exist yet")
    system_prompt: bool = Field(True, description="prepend the persona's system prompt to "
                                                  "conversations without one, as chat does")
    gradient_checkpointing: bool = Field(False, description="GPU only; always off on CPU")
    logging_steps: int = Field(5, gt=0, description="steps between loss events")
    keep_checkpoints: int = Field(2, ge=1, description="checkpoints kept, the newest")
    check_memory: bool = Field(True, description="refuse to start a run the memory model "
                               "says will not fit")
    eval_questions: int | None = Field(None, ge=0, description="evaluation after training: "
                                       "how many of the persona's eval questions (default "
                                       "all; 0 = skip)")
    eval_max_new_tokens: int = Field(48, gt=0, description="reply budget of that evaluation")
    # --- training on several GPUs (issue 18) ---
    processes: int = Field(1, ge=1, description="training processes (one per GPU) under "
                           "Accelerate; batch_size is the global batch, split evenly among them")
    distributed: Literal["ddp", "fsdp"] = Field("ddp", description="with processes > 1: DDP "
                                                "(a full copy per GPU) or FSDP (sharded; CUDA)")

    @model_validator(mode="after")
    def _consistent(self) -> AdapterJob:
        self._check()  # the job's own rules first, then how the batch splits
        _check_processes(self)
        return self

    def _check(self) -> None:
        """The job's own cross-field rules; a ValueError names the keys."""


class TrainJob(AdapterJob):
    job: Literal["train"] = Field(description="the job kind")
    base: str = Field(description="model variant name (hf backend) to fine-tune")
    data: str | None = Field(None, description="default: the persona's dialogues.jsonl")
    epochs: float = Field(3, gt=0, description="passes over the training data")
    learning_rate: float = Field(2e-4, gt=0, description="peak learning rate")
    batch_size: int = Field(8, gt=0, description="conversations per step")
    max_seq_len: int = Field(512, gt=0, description="tokens per example; longer ones truncated")
    eval_fraction: float = Field(0.1, ge=0, lt=1, description="share of the conversations "
                                 "held out for the eval loss")
    save_steps: int = Field(50, gt=0, description="steps between checkpoints")
    prep: bool = Field(True, description="run data preparation (NFC, 。, newlines, de-dup)")
    max_reply_chars: int = Field(120, gt=0, description="data prep: drop longer replies")
    judge: str | None = Field(None, description="a judge for the mini-evaluation, if reachable")
    # --- training on the retrieval prompt (issue 17) ---
    rag_share: float = Field(0, ge=0, le=1, description="share of the examples (chosen by "
                             "seed) whose system prompt is the persona's retrieval prompt with "
                             "the facts retrieval finds for the last user turn, as chat renders "
                             "it; the facts a dialogue names (knowledge_ids) put in if missed")
    rag_k: int = Field(5, ge=1, le=50, description="facts in a retrieval prompt: chat's k (5)")
    rag_keep_plain: bool = Field(False, description="keep the plain-prompt example of each "
                                 "conversation given the retrieval prompt too (the retrieval "
                                 "examples are added, not swapped in)")

    def _check(self) -> None:
        if self.rag_share > 0 and not self.system_prompt:
            raise ValueError("rag_share: the retrieval prompt is a system prompt; it needs "
                             "system_prompt: true")


class PairSettings(Strict):
    """Preference pairs made without a human: N sampled replies per training prompt from the
    variant being trained, scored with the persona's style checks; best vs worst kept when
    the scores differ by at least `margin`."""

    samples: int = Field(4, ge=2, description="replies sampled per prompt")
    temperature: float = Field(1.0, gt=0, description="sampling temperature (> 0)")
    max_new_tokens: int = Field(48, gt=0, description="the longest sampled reply, in tokens")
    margin: float = Field(0.15, ge=0, le=1, description="least style-score gap (0..1) between "
                          "the best and the worst reply for the pair to be kept")
    prompts: str | None = Field(None, description="JSON Lines of {id, question} or {messages} "
                                "(the user turns); default: the user turns of the persona's "
                                "dialogues.jsonl")
    limit: int | None = Field(None, ge=1, description="the first N prompts only")
    batch_size: int = Field(8, ge=1, description="sequences per generate call")
    judge: str | None = Field(None, description="also score every sample with this judge "
                              "(verdicts cached in the store: a rerun asks nothing twice)")
    criteria: list[str] = Field(default_factory=lambda: ["personality"], min_length=1,
                                description="the judge's criteria, averaged")
    judge_weight: float = Field(0.5, ge=0, le=1, description="share of the judge's score "
                                "(1..7 mapped to 0..1) in a sample's score; the rest is style")


class PreferJob(AdapterJob):
    """Preference training (DPO / KTO / ORPO through TRL) of an hf variant, as a new LoRA
    adapter: a fresh one on a plain base, or a copy of the variant's (or `adapter:`'s) SFT
    adapter trained further. Data: a preference file in TRL's conversational format, or
    pairs made by sampling and style-scoring (`pairs:`)."""

    job: Literal["prefer"] = Field(description="the job kind")
    base: str = Field(description="model variant name (hf backend); its adapter, if it has "
                                  "one, is where training starts")
    adapter: str | None = Field(None, description="a PEFT adapter folder to start from "
                                "instead of the variant's own (never written to)")
    method: Literal["dpo", "kto", "orpo"] = Field("dpo", description="the TRL trainer")
    data: str | None = Field(None, description="a preference file (JSON Lines): dpo / orpo "
                             "prompt, chosen, rejected; kto prompt, completion, label (or "
                             "pairs, unpaired)")
    pairs: PairSettings | None = Field(None, description="make the pairs by sampling instead")
    beta: float = Field(0.1, gt=0, description="DPO / KTO: strength of the reference; "
                        "ORPO: weight of the odds-ratio term")
    epochs: float = Field(1, gt=0, description="passes over the preference data")
    learning_rate: float = Field(5e-5, gt=0, description="peak learning rate")
    batch_size: int = Field(4, gt=0, description="pairs (kto: examples) per step")
    max_seq_len: int = Field(256, gt=0, description="tokens per prompt and reply; longer "
                             "ones truncated")
    eval_fraction: float = Field(0.0, ge=0, lt=1, description="share of the pairs held out "
                                 "for the eval loss")
    save_steps: int = Field(20, gt=0, description="steps between checkpoints")
    judge: str | None = Field(None, description="a judge for the before / after evaluation")

    def _check(self) -> None:
        if (self.data is None) == (self.pairs is None):
            raise ValueError("set exactly one of 'data' (a preference file) and 'pairs' "
                             "(sample and style-rank replies)")
