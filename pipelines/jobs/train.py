"""The `train` job: LoRA / QLoRA fine-tuning of an hf variant on a persona's dialogues.

`run` is the list of its stages, each a function a test can call on its own (a generator
of events that returns what the next stage needs):

    prepare_data        data       the conversations, prepared and written beside the run
    rag_prompts         rag        (rag_share > 0) the retrieval prompt on that share of them
    tokenise            model      base model files (dequantised from the packaged GGUF when
                                   asked), tokenizer, examples, label check, train/eval split
    check_memory        memory     the one memory model; refuses a run that will not fit
    load_trainer        load       base model, TRL SFTTrainer (+ PEFT), collated label check,
                                   the checkpoint to resume from
    train               train      the trainer in a worker thread, its progress as events
    save_and_register   save       adapter written whole, config beside it, variant registered
    mini_evaluation     eval       base vs trained on the persona's eval questions

Where things go (`output`, default `<home>/runs/<job name>/`):

    data.prepared.jsonl   the conversations trained on (the source file is not touched);
                          with rag_share, the retrieval prompts and their fact ids in them
    checkpoints/          checkpoint-N/ every save_steps; resumed by the next run of this job
    adapter/              the final LoRA adapter (written to a temporary folder, renamed)
    config.yaml           the resolved job config, beside the adapter
    eval.json             the mini-evaluation: figures and replies, base and trained
    labels.txt            when the label check refuses the run: the token view

Training runs in a thread because the trainer blocks and a job is a generator: the
callback queues events and this generator yields them. A cancel (SIGTERM) stops the
trainer at the end of its step, after a checkpoint, so the next run goes on from there.
"""

from __future__ import annotations

import gc
import json
import os
import queue
import random
import shutil
import time
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import yaml

from pipelines import events as ev
from pipelines import jobs
from pipelines.config import ConfigError, GGUFVariant, HFVariant, Persona, TrainJob
from pipelines.events import Event
from pipelines.files import replace_folder
from pipelines.home import RUNS
from pipelines.jobs import JobContext
from pipelines.training.data import PrepOptions, prepare, read_conversations, write_jsonl
from pipelines.training.examples import Example

LABELS_FILE = "labels.txt"


def output_dir(cfg: TrainJob, home: Path) -> Path:
    return jobs.output_dir(cfg.output, home, RUNS, cfg.name)


def variant_name(cfg: TrainJob) -> str:
    """The name the trained variant is registered under."""
    return cfg.variant or cfg.name


def run(cfg: TrainJob, ctx: JobContext) -> Iterator[Event]:
    passive_openmp()
    started = time.perf_counter()
    name = variant_name(cfg)
    yield ev.start("train", cfg.name, f"persona {cfg.persona}, base {cfg.base} -> {name}")
    persona = ctx.workspace.persona(cfg.persona)
    base = base_variant(ctx, cfg)
    out = output_dir(cfg, ctx.home)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"variant": name, "output": str(out)}  # the done event's

    rows = yield from prepare_data(cfg, ctx, out, summary)
    rows = yield from rag_prompts(cfg, ctx, persona, rows, out, summary)
    data = yield from tokenise(cfg, ctx, base, persona, rows, out)
    cuda = yield from check_memory(cfg, data, summary)
    if cfg.processes > 1:  # the load and train stages in processes under Accelerate
        trainer = yield from train_in_processes(cfg, ctx, base, data, out, cuda, summary)
    else:
        trainer, resume = yield from load_trainer(cfg, base, data, out, cuda, summary)
        yield from train(cfg, ctx, trainer, resume, data, summary)
    adapter = yield from save_and_register(cfg, ctx, base, trainer, out, summary)
    del trainer  # the base model and its optimizer state go before the evaluation loads two
    release_memory(cuda)
    yield from mini_evaluation(cfg, ctx, persona, base, data, adapter, cuda, out, summary)
    summary["seconds"] = round(time.perf_counter() - started, 1)
    yield ev.done(summary)


def passive_openmp() -> None:
    """OpenMP threads that sleep while they wait instead of spinning. With one of 2 cores
    taken (the console's chat generating, another job) a training step of a 270M-shaped model
    ran 1.44x faster; with the cores free, 0.90x (bench/omp_wait.py). Training runs long, beside
    the chat, so it takes the trade; the other jobs do not (llama.cpp decodes at 0.55x when the
    cores are free). OpenMP reads the variable once, when torch loads it, so it must be in the
    environment before any stage imports torch, and it cannot be scoped to a stage.
    Process-wide is right: the runner gives every job its own process. A value the user set
    wins."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


# --- where the base model comes from ----------------------------------------------------


def base_variant(ctx: JobContext, cfg: TrainJob) -> HFVariant:
    variant = ctx.workspace.variant(cfg.base)
    if not isinstance(variant, HFVariant):
        raise ConfigError(f"base: variant '{cfg.base}' uses the {variant.backend} backend; "
                          "training needs an hf variant (a transformers model folder)")
    return variant


def ensure_base_files(ctx: JobContext, cfg: TrainJob, base: HFVariant) -> tuple[Path | str, str | None]:
    """The base model's folder (or hub id), and a note when it was dequantised now."""
    from pipelines.inference.sources import resolve_hf_model, resolve_path

    path = resolve_path(base.model, ctx.home)
    if path.exists():
        return path, None
    if cfg.dequantize_from:
        source = ctx.workspace.variant(cfg.dequantize_from)
        if not isinstance(source, GGUFVariant):
            raise ConfigError(f"dequantize_from: variant '{cfg.dequantize_from}' is not a gguf "
                              "variant")
        if source.embedded:
            from pipelines.inference.embedded import ensure_embedded

            gguf = ensure_embedded(source.embedded, ctx.home)
        else:
            gguf = resolve_path(source.path or "", ctx.home)
        from pipelines.inference.dequantize import dequantize_gguf

        dequantize_gguf(gguf, path)
        return path, f"dequantised {gguf.name} into {path} (once; later runs reuse it)"
    # a folder kyara makes (made now), a hub id (cached, or online), else one line at once
    return resolve_hf_model(base.model, ctx.home, variant=base.name), None


def split(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held = round(n * fraction) if fraction > 0 else 0
    if fraction > 0 and n >= 4:
        held = max(1, held)
    held = min(held, n - 1)
    return sorted(order[held:]), sorted(order[:held])


# --- data -------------------------------------------------------------------------------


def prepare_data(cfg: TrainJob, ctx: JobContext, out: Path,
                 summary: dict[str, Any]) -> Generator[Event, None, list[dict[str, Any]]]:
    """The conversations to train on (prepared when `prep`), written to
    data.prepared.jsonl; returns them."""
    yield ev.stage("data", "reading and preparing the conversations")
    source = Path(cfg.data) if cfg.data else ctx.workspace.persona_dir(cfg.persona) / "dialogues.jsonl"
    rows = read_conversations(source)
    summary["source"] = str(source)
    if cfg.prep:
        rows, report = prepare(rows, PrepOptions(max_chars=cfg.max_reply_chars))
        if not rows:
            raise ConfigError(f"{source}: no conversation is left after preparation")
        yield ev.log("data preparation:\n" + report.text())
        yield ev.metric("conversations", report.after.conversations, stage="data")
        yield ev.metric("ending_maru", report.after.ending_maru, stage="data")
        summary["prep"] = report.to_dict()
    write_jsonl(out / "data.prepared.jsonl", rows)
    ctx.check_cancelled()
    return rows


def rag_prompts(cfg: TrainJob, ctx: JobContext, persona: Persona, rows: list[dict[str, Any]],
                out: Path, summary: dict[str, Any]
                ) -> Generator[Event, None, list[dict[str, Any]]]:
    """`rag_share` of the conversations with the retrieval prompt chat renders for their
    last user turn (training/rag_examples.py), written back to data.prepared.jsonl; the
    rows unchanged, and no stage, when the share is 0."""
    if cfg.rag_share <= 0:
        return rows
    yield ev.stage("rag", f"the retrieval prompt on {cfg.rag_share:.0%} of the conversations")
    from pipelines.retrieval.opening import open_retriever
    from pipelines.training.rag_examples import add_rag_prompts, indexed_facts

    retriever, note = open_retriever(ctx.store, persona.id, ctx.home, workspace=ctx.workspace,
                                     needed_by="rag_share: the retrieval prompt")
    if note:
        yield ev.log(note)
    try:
        rows, counts = add_rag_prompts(rows, persona, retriever,
                                       indexed_facts(ctx.store, persona.id), cfg.rag_share,
                                       cfg.rag_k, cfg.seed, cfg.rag_keep_plain)
        if retriever.note:  # an index an earlier kyara wrote: retrieval is not chat's now
            yield ev.log(retriever.note, level="warning")
    finally:
        retriever.close()
    yield ev.log(counts.text(cfg.rag_share, cfg.rag_k)
                 + ("; each beside its plain example" if cfg.rag_keep_plain else ""))
    for key in ("examples", "gold_retrieved", "gold_inserted"):
        yield ev.metric(f"rag_{key}", getattr(counts, key), stage="rag")
    summary["rag"] = counts.to_dict()
    write_jsonl(out / "data.prepared.jsonl", rows)
    ctx.check_cancelled()
    return rows


# --- model files and examples -----------------------------------------------------------


@dataclass
class Tokenised:
    """What the model stage hands on: where the base model is, its tokenizer and chat
    template, the turn terminator, and the examples split into train and eval."""

    model_source: Path | str
    tokenizer: Any
    model_config: Any
    template: str
    end_text: str
    end_id: int
    examples: list[Example]
    train_idx: list[int]
    eval_idx: list[int]

    def rows(self, indices: Sequence[int]) -> list[dict[str, list[int]]]:
        return [self.examples[i].as_row() for i in indices]


def tokenise(cfg: TrainJob, ctx: JobContext, base: HFVariant, persona: Persona,
             rows: list[dict[str, Any]], out: Path) -> Generator[Event, None, Tokenised]:
    """The base model's files, then every conversation as token ids and labels, each
    checked (`check_example_labels`), split into train and eval."""
    yield ev.stage("model", f"base {cfg.base}")
    model_source, note = ensure_base_files(ctx, cfg, base)
    if note:
        yield ev.log(note)
    from pipelines.training.examples import load_chat_format, tokenize, with_system

    fmt = load_chat_format(model_source)
    tokenizer, model_config, template = fmt.tokenizer, fmt.model_config, fmt.template
    end_text, end_id = fmt.end_text, fmt.end_id
    system = persona.prompts.system if cfg.system_prompt else None
    examples = [tokenize(tokenizer, template, with_system(r["messages"], system), cfg.max_seq_len,
                         end_text)
                for r in rows]
    for index, example in enumerate(examples):
        yield from check_example_labels(
            tokenizer, example.input_ids, example.labels, end_id, out,
            heading=f"example {index} as the model sees it (also in {out / LABELS_FILE}):\n",
            where=f"example {index} ({rows[index].get('id', index)}): ")
    train_idx, eval_idx = split(len(examples), cfg.eval_fraction, cfg.seed)
    yield ev.log(f"{len(train_idx)} training and {len(eval_idx)} eval examples; the turn "
                 f"terminator {end_text} is trained in every one")
    ctx.check_cancelled()
    return Tokenised(model_source, tokenizer, model_config, template, end_text, end_id,
                     examples, train_idx, eval_idx)


def check_example_labels(tokenizer: Any, input_ids: Sequence[int], labels: Sequence[int],
                         end_id: int, out: Path, heading: str, where: str) -> Iterator[Event]:
    """The label check, for a tokenised example and for one as the trainer's collator hands
    it to the model: nothing when the reply and its terminator are trained; else the token
    view goes to labels.txt and into an error log event (after `heading`), and a LabelError
    (a ConfigError, its message starting with `where`) stops the run."""
    from pipelines.training.examples import check_labels, label_view, require_good_labels

    if not check_labels(tokenizer, input_ids, labels, end_id):
        return
    view = label_view(tokenizer, input_ids, labels)
    (out / LABELS_FILE).write_text(view + "\n", encoding="utf-8")
    yield ev.log(heading + view, level="error")
    require_good_labels(tokenizer, input_ids, labels, end_id, where=where)


# --- memory -----------------------------------------------------------------------------


def check_memory(cfg: TrainJob, data: Tokenised,
                 summary: dict[str, Any]) -> Generator[Event, None, bool]:
    """The device, QLoRA's requirements, and the memory estimate (the one memory model,
    on what `kyara plan` reads too: headers, config, data); refuses a run that will not
    fit when `check_memory`. Returns whether it trains on CUDA."""
    from pipelines.jobs.trainer_loop import check_memory as memory_stage
    from pipelines.training.memory import data_sizes

    return (yield from memory_stage(cfg, data.model_source, data.model_config,
                                    lambda: data_sizes(data.examples, cfg.max_seq_len),
                                    summary))


# --- model and trainer ------------------------------------------------------------------


def load_trainer(cfg: TrainJob, base: HFVariant, data: Tokenised, out: Path, cuda: bool,
                 summary: dict[str, Any]) -> Generator[Event, None, tuple[Any, Path | None]]:
    """The base model with its LoRA, in a KyaraSFTTrainer whose collated labels pass the
    label check; returns the trainer and the checkpoint to resume from (None: from the
    start)."""
    yield ev.stage("load", "loading the base model")
    model = load_model(cfg, base, data, cuda)
    if cfg.gradient_checkpointing and not cuda:
        yield ev.log("gradient_checkpointing is ignored on the CPU (it makes a step ~10x "
                     "slower there)", level="warning")
    trainer = make_trainer(cfg, data, model, out, cuda)
    yield from check_collated_labels(trainer, data, out)
    resume = yield from find_checkpoint(cfg, data, out, summary)
    return trainer, resume


def load_model(cfg: TrainJob, base: HFVariant, data: Tokenised, cuda: bool) -> Any:
    """The base model: bf16 on CUDA (4-bit NF4 with `qlora`), fp32 on the CPU."""
    from pipelines.training.trainer import load_base_model

    return load_base_model(cfg, data.model_source, data.model_config.model_type,
                           base.attn_implementation, cuda)


def make_trainer(cfg: TrainJob, data: Tokenised, model: Any, out: Path, cuda: bool) -> Any:
    """TRL's SFTTrainer (kyara's subclass) with the PEFT LoRA config, on the ready-made
    examples; checkpoints under out/checkpoints."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig

    from pipelines.training.trainer import KyaraSFTTrainer, common_arguments

    lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=cfg.lora.target_modules, task_type="CAUSAL_LM")
    train_rows, eval_rows = data.rows(data.train_idx), data.rows(data.eval_idx)
    args = SFTConfig(
        **common_arguments(cfg, out, cuda, bool(eval_rows)),
        train_sampling_strategy="group_by_length",  # less padding: ~25% fewer tokens here
        prediction_loss_only=True,
    )
    return KyaraSFTTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(train_rows),
        eval_dataset=Dataset.from_list(eval_rows) if eval_rows else None,
        processing_class=data.tokenizer, peft_config=lora)


def check_collated_labels(trainer: Any, data: Tokenised, out: Path) -> Iterator[Event]:
    """The last guard: the labels as the trainer's own collator hands them to the model
    (the first few training examples)."""
    probe = [trainer.train_dataset[i] for i in range(min(len(trainer.train_dataset), 4))]
    batch = trainer.data_collator(probe)
    for row in range(len(probe)):
        yield from check_example_labels(
            data.tokenizer, batch["input_ids"][row].tolist(), batch["labels"][row].tolist(),
            data.end_id, out, heading="a collated example as the model sees it:\n",
            where="collator: ")


def find_checkpoint(cfg: TrainJob, data: Tokenised, out: Path,
                    summary: dict[str, Any]) -> Generator[Event, None, Path | None]:
    """The complete checkpoint of this same run (base, data, settings) to resume from, if
    any; checkpoints of another run are set aside with a warning."""
    from pipelines.training.trainer import prepare_checkpoints

    fingerprint = {
        "base": str(data.model_source), "data": _digest(data.rows(data.train_idx)),
        "eval": _digest(data.rows(data.eval_idx)),
        "settings": cfg.model_dump(mode="json", include={
            "lora", "qlora", "epochs", "max_steps", "learning_rate", "batch_size", "grad_accum",
            "max_seq_len", "seed", "save_steps"}
            # only when on: checkpoints of runs from before rag_share still resume
            | ({"rag_share", "rag_k", "rag_keep_plain"} if cfg.rag_share > 0 else set())
            | ({"processes", "distributed"} if cfg.processes > 1 else set())),
    }
    resume, notes = prepare_checkpoints(out / "checkpoints", fingerprint)
    for message in notes:
        yield ev.log(message, level="warning")
    if resume is not None:
        yield ev.log(f"resuming from {resume.name}")
        summary["resumed_from"] = resume.name
    return resume


# --- train ------------------------------------------------------------------------------


def train(cfg: TrainJob, ctx: JobContext, trainer: Any, resume: Path | None, data: Tokenised,
          summary: dict[str, Any]) -> Iterator[Event]:
    """The trainer in a worker thread; its callback's events yielded as they come. A cancel
    stops it at the end of a step (after a checkpoint) and raises JobCancelled here."""
    from pipelines.jobs.trainer_loop import run_training
    from pipelines.training.trainer import EventCallback

    yield ev.stage("train", f"{len(data.train_idx)} examples, up to {cfg.epochs:g} epochs")
    events: queue.Queue[Any] = queue.Queue()
    callback = EventCallback(events.put, ctx.cancelled, partial(getattr, trainer, "tokens_seen"))
    trainer.add_callback(callback)
    train_seconds = yield from run_training(trainer, resume, ctx, events,
                                            f"kyara-train-{cfg.name}")
    state = trainer.state
    summary.update({
        "steps": state.global_step, "epochs": round(float(state.epoch or 0), 3),
        "train_seconds": round(train_seconds, 1),
        "tokens_per_s": round(trainer.tokens_seen / train_seconds, 1) if train_seconds else None,
        "train_loss": callback.last_loss, "eval_loss": callback.last_eval,
    })
    if data.eval_idx and callback.last_eval_step != state.global_step:  # not twice for one step
        metrics = trainer.evaluate()
        if "eval_loss" in metrics:
            summary["eval_loss"] = round(float(metrics["eval_loss"]), 4)
            yield ev.metric("eval_loss", metrics["eval_loss"], step=state.global_step,
                            stage="train")


def train_in_processes(cfg: TrainJob, ctx: JobContext, base: HFVariant, data: Tokenised,
                       out: Path, cuda: bool, summary: dict[str, Any]) -> Generator[Event, None, Any]:
    """`processes` > 1: the checkpoint to resume from chosen here, then the trainer built
    and run in that many processes from the rows tokenised here (trainer_loop); returns
    what save_and_register saves from (the adapter rank 0 wrote)."""
    from pipelines.jobs import trainer_loop

    resume = yield from find_checkpoint(cfg, data, out, summary)
    spec = {"model_source": str(data.model_source), "model_type": data.model_config.model_type,
            "attn_implementation": base.attn_implementation,
            "train_rows": data.rows(data.train_idx), "eval_rows": data.rows(data.eval_idx)}
    return (yield from trainer_loop.train_in_processes(cfg, ctx, "train", out, resume, cuda,
                                                       spec, len(data.train_idx), summary))


# --- save and register ------------------------------------------------------------------


def save_and_register(cfg: TrainJob, ctx: JobContext, base: HFVariant, trainer: Any, out: Path,
                      summary: dict[str, Any]) -> Generator[Event, None, Path]:
    """The adapter written whole (a temporary folder, renamed), the resolved config beside
    it, and the variant registered (store row + <home>/models/<name>.yaml). Returns the
    adapter folder."""
    yield ev.stage("save", "writing the adapter")
    adapter = out / "adapter"
    tmp = out / f".adapter.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    trainer.model.save_pretrained(tmp)
    _replace_dir(tmp, adapter)
    (out / "config.yaml").write_text(
        f"# resolved config of the run {ctx.run_id} that wrote {adapter.name}/\n"
        + yaml.safe_dump(cfg.model_dump(mode="json"), allow_unicode=True, sort_keys=False),
        encoding="utf-8")
    from pipelines.variants import register, trained_variant, write_variant_yaml

    name = variant_name(cfg)
    variant = trained_variant(base, name, adapter, f"{cfg.base} + LoRA from job {cfg.name}")
    variant_yaml = write_variant_yaml(variant, ctx.home,
                                      f"written by the train job {cfg.name} (run {ctx.run_id})")
    register(ctx.store, variant, base=cfg.base, run_id=ctx.run_id, yaml_path=variant_yaml)
    yield ev.log(f"variant {name} registered: {variant_yaml}")
    summary.update({"adapter": str(adapter), "variant_yaml": str(variant_yaml)})
    return adapter


def release_memory(cuda: bool) -> None:
    """What the trainer held (model, optimizer, the callback's cycle back to the trainer)
    freed now, once the caller has dropped its reference."""
    gc.collect()
    if cuda:
        import torch

        torch.cuda.empty_cache()


# --- mini-evaluation --------------------------------------------------------------------


def mini_evaluation(cfg: TrainJob, ctx: JobContext, persona: Persona, base: HFVariant,
                    data: Tokenised, adapter: Path, cuda: bool, out: Path,
                    summary: dict[str, Any]) -> Iterator[Event]:
    """Base vs trained, greedy, on the persona's eval questions (none: no stage); the
    figures and replies in eval.json, the table in the log."""
    persona_data = ctx.workspace.persona_data(cfg.persona)
    questions = (persona_data.eval if cfg.eval_questions is None
                 else persona_data.eval[:cfg.eval_questions])
    if not questions:
        return
    name = variant_name(cfg)
    yield ev.stage("eval", f"{len(questions)} eval questions, base vs {name}")
    from pipelines.training.mini_eval import run_mini_eval

    report = run_mini_eval(ctx, cfg, persona, base.name, name, data.model_source, adapter,
                           [q.question for q in questions], data.template, data.end_id, cuda,
                           attn_implementation=base.attn_implementation)
    (out / "eval.json").write_text(json.dumps(report, ensure_ascii=False, indent=2) + "\n",
                                   encoding="utf-8")
    yield ev.log("mini-evaluation (greedy, max "
                 f"{cfg.eval_max_new_tokens} new tokens):\n" + report["table"])
    for key in ("ends_maru", "ojousama", "median_chars", "stop_eos"):
        yield ev.metric(f"eval_{key}", report["after"][key], stage="eval")
    summary["mini_eval"] = {k: report[k] for k in ("before", "after", "table")}


def _digest(rows: list[dict[str, list[int]]]) -> str:
    import hashlib

    blob = json.dumps(rows, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _replace_dir(new: Path, target: Path) -> None:
    """`target` becomes `new` by renames only: never a half-written adapter under its name."""
    replace_folder(new, target)
