"""The `prefer` job: preference training (DPO / KTO / ORPO, TRL's trainers) of an hf variant
as a new LoRA adapter, fresh on a plain base or continuing the variant's SFT adapter (a copy:
the original folder is only read).

`run` is the list of its stages, each a function a test can call on its own:

    read_data           data      the preference file read and checked row by row (or the
                                  prompts to sample), before any model is loaded
    tokenise            model     base files, tokenizer, the adapter to start from; a file's
                                  rows as the train job's ids, every sequence label-checked
    check_memory        memory    the one memory model (memory.prefer_estimate); refuses a
                                  run that will not fit, as `kyara plan` shows it
    make_pairs          pairs     (with `pairs:`) N samples per prompt from the starting
                                  variant, style-scored (and judged with pairs.judge), best
                                  vs worst; resumable
    load_trainer        load      the base with the adapter to train, the method's trainer,
                                  the checkpoint to resume from
    train               train     the trainer in a worker thread, its progress as events
    save_and_register   save      adapter written whole, config beside it, variant registered
    before_after        eval      the starting variant vs the trained one on the persona's
                                  held-out questions

Where things go (`output`, default `<home>/runs/<job name>/`): samples.jsonl, judged.jsonl
and pairs.jsonl (with `pairs:`), checkpoints/, adapter/, config.yaml, eval.json, labels.txt
(a refused label check).

Why pairs are a stage and not a job of their own: they must come from the very model the
run trains (its starting adapter, its template and system prompt), they share the run's
output folder and its resume, and the quick-start is then one job file. pairs.jsonl is a
preference file: another prefer job can take it as `data:`.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import yaml

from pipelines import events as ev
from pipelines.config import ConfigError, HFVariant, Persona, PreferJob
from pipelines.events import Event
from pipelines.jobs import JobContext
from pipelines.jobs.train import (
    _replace_dir,
    check_example_labels,
    ensure_base_files,
    output_dir,
    passive_openmp,
    release_memory,
    split,
    variant_name,
)


def run(cfg: PreferJob, ctx: JobContext) -> Iterator[Event]:
    passive_openmp()
    started = time.perf_counter()
    name = variant_name(cfg)
    yield ev.start("prefer", cfg.name, f"{cfg.method} on {cfg.base} -> {name}")
    if cfg.method == "kto" and cfg.batch_size // cfg.processes < 2:
        raise ConfigError("batch_size: kto needs at least 2 per process (its KL term pairs "
                          "each completion with another prompt of the batch)")
    persona = ctx.workspace.persona(cfg.persona)
    base = base_variant(ctx, cfg)
    out = output_dir(cfg, ctx.home)
    summary: dict[str, Any] = {"variant": name, "method": cfg.method, "output": str(out)}

    rows = yield from read_data(cfg, ctx, summary)  # bad input stops here: nothing written
    out.mkdir(parents=True, exist_ok=True)
    data = yield from tokenise(cfg, ctx, base, persona, rows, out, summary)
    cuda = yield from check_memory(cfg, data, summary)
    if cfg.pairs is not None:
        yield from make_pairs(cfg, ctx, persona, data, out, cuda, summary)
    if cfg.processes > 1:  # the load and train stages in processes under Accelerate
        trainer = yield from train_in_processes(cfg, ctx, data, out, cuda, summary)
    else:
        trainer, resume = yield from load_trainer(cfg, base, data, out, cuda, summary)
        yield from train(cfg, ctx, trainer, resume, data, summary)
    adapter = yield from save_and_register(cfg, ctx, trainer, out, summary)
    del trainer
    release_memory(cuda)
    yield from before_after(cfg, ctx, persona, data, adapter, cuda, out, summary)
    summary["seconds"] = round(time.perf_counter() - started, 1)
    yield ev.done(summary)


def base_variant(ctx: JobContext, cfg: PreferJob) -> HFVariant:
    variant = ctx.workspace.variant(cfg.base)
    if not isinstance(variant, HFVariant):
        raise ConfigError(f"base: variant '{cfg.base}' uses the {variant.backend} backend; "
                          "preference training needs an hf variant (a transformers model folder)")
    return variant


def start_adapter(cfg: PreferJob, base: HFVariant, home: Path) -> Path | None:
    """The adapter training starts from: `adapter:`, else the variant's, else none."""
    from pipelines.inference.sources import resolve_path

    ref = cfg.adapter or base.adapter
    if not ref:
        return None
    path = resolve_path(ref, home)
    where = "adapter" if cfg.adapter else f"base: variant '{cfg.base}' adapter"
    if not (path / "adapter_config.json").is_file():
        raise ConfigError(f"{where}: {path} is not a PEFT adapter folder (no "
                          "adapter_config.json)")
    return path


# --- data -------------------------------------------------------------------------------


def read_data(cfg: PreferJob, ctx: JobContext,
              summary: dict[str, Any]) -> Generator[Event, None, list[dict[str, Any]]]:
    """The preference rows, checked (one line naming the file and row on bad input), or the
    prompts to sample pairs for. Nothing is loaded yet."""
    if cfg.data:
        from pipelines.training.preference import read_preferences

        yield ev.stage("data", f"reading the preference file {cfg.data}")
        rows = read_preferences(cfg.data, cfg.method)
        summary["source"] = str(Path(cfg.data))
        yield ev.metric("rows", len(rows), stage="data")
    else:
        from pipelines.training.pairs import read_prompts

        yield ev.stage("data", "reading the prompts to sample pairs for")
        rows = read_prompts(ctx.workspace, cfg)
        yield ev.metric("prompts", len(rows), stage="data")
    ctx.check_cancelled()
    return rows


@dataclass
class PreferData:
    model_source: Path | str
    model_type: str
    attn_implementation: str | None
    start: Path | None
    tokenizer: Any
    model_config: Any
    template: str
    end_text: str
    end_id: int
    system: str | None
    prompts: list[dict[str, Any]]         # pairs: the prompts to sample for
    rows: list[dict[str, Any]]             # the checked preference rows
    encoded: Any = None                    # preference.Encoded
    train_idx: list[int] | None = None
    eval_idx: list[int] | None = None

    def trainer_rows(self, indices: list[int]) -> list[dict[str, Any]]:
        return [self.encoded.rows[i] for i in indices]


def tokenise(cfg: PreferJob, ctx: JobContext, base: HFVariant, persona: Persona,
             rows: list[dict[str, Any]], out: Path,
             summary: dict[str, Any]) -> Generator[Event, None, PreferData]:
    """Base files, tokenizer, template and terminator, the adapter to start from; a
    preference file's rows as ids, each sequence label-checked, split into train / eval."""
    yield ev.stage("model", f"base {cfg.base}")
    model_source, note = ensure_base_files(ctx, cfg, base)
    if note:
        yield ev.log(note)
    from pipelines.training.examples import load_chat_format

    fmt = load_chat_format(model_source)
    tokenizer, model_config, template = fmt.tokenizer, fmt.model_config, fmt.template
    end_text, end_id = fmt.end_text, fmt.end_id
    start = start_adapter(cfg, base, ctx.home)
    summary["start_adapter"] = str(start) if start else None
    if start is not None:
        r = json.loads((start / "adapter_config.json").read_text(encoding="utf-8")).get("r")
        if r != cfg.lora.r:
            yield ev.log(f"lora: the adapter trained is {start.name}'s own (r {r}); the memory "
                         f"estimate counts lora.r {cfg.lora.r}: set it to {r} to match",
                         level="warning")
    yield ev.log(f"training {'a copy of the adapter ' + str(start) if start else 'a new LoRA'}"
                 f" with {cfg.method}; the turn terminator {end_text} is trained in every "
                 "completion")
    data = PreferData(model_source, model_config.model_type, base.attn_implementation, start,
                      tokenizer, model_config, template, end_text, end_id,
                      persona.prompts.system if cfg.system_prompt else None,
                      rows if cfg.pairs is not None else [],
                      rows if cfg.pairs is None else [])
    if cfg.pairs is None:
        yield from encode_rows(cfg, data, out)
    ctx.check_cancelled()
    return data


def encode_rows(cfg: PreferJob, data: PreferData, out: Path) -> Iterator[Event]:
    """data.rows as the method's trainer rows (the train job's ids), label-checked, split."""
    from pipelines.training.preference import encode

    data.encoded = encode(data.rows, cfg.method, data.tokenizer, data.template, data.system,
                          cfg.max_seq_len, data.end_text)
    for seq, (example, row) in enumerate(zip(data.encoded.sequences, data.encoded.row_of,
                                             strict=True)):
        ident = data.rows[row].get("id", row)
        side = ("chosen", "rejected")[seq % 2] if cfg.method in ("dpo", "orpo") else "completion"
        yield from check_example_labels(
            data.tokenizer, example.input_ids, example.labels, data.end_id, out,
            heading=f"row {row} ({ident}) {side} as the model sees it:\n",
            where=f"row {row} ({ident}) {side}: ")
    data.train_idx, data.eval_idx = split(len(data.encoded.rows), cfg.eval_fraction, cfg.seed)
    unit = "pairs" if cfg.method in ("dpo", "orpo") else "examples"
    yield ev.log(f"{len(data.train_idx)} training and {len(data.eval_idx)} eval {unit}")


# --- memory -----------------------------------------------------------------------------


def check_memory(cfg: PreferJob, data: PreferData,
                 summary: dict[str, Any]) -> Generator[Event, None, bool]:
    """The train job's memory check on the prefer estimate (two sequences per row, the
    reference); with pairs, on the bound the samples can reach."""
    from pipelines.jobs.trainer_loop import check_memory as memory_stage
    from pipelines.training.memory import data_sizes, pairs_sizes

    def sizes() -> Any:
        if data.encoded is not None:
            return data_sizes(data.encoded.sequences, cfg.max_seq_len)
        return pairs_sizes(cfg, data.tokenizer, data.template, data.end_text, data.system,
                           data.prompts)

    return (yield from memory_stage(cfg, data.model_source, data.model_config, sizes, summary,
                                    f"{cfg.method}, two sequences per row"))


# --- pairs ------------------------------------------------------------------------------


def make_pairs(cfg: PreferJob, ctx: JobContext, persona: Persona, data: PreferData, out: Path,
               cuda: bool, summary: dict[str, Any]) -> Iterator[Event]:
    """Samples from the starting variant (samples.jsonl, resumed), best vs worst by style
    score (pairs.jsonl), then the pairs as ids like a preference file's."""
    from peft import PeftModel

    from pipelines.evaluation import end_of_generation_ids
    from pipelines.inference.loading import default_dtype, load_causal_lm
    from pipelines.training import pairs as pairing

    settings = cfg.pairs
    assert settings is not None
    yield ev.stage("pairs", f"{settings.samples} samples per prompt at temperature "
                   f"{settings.temperature:g}, style-ranked, margin {settings.margin:g}")
    identity = {"model": str(data.model_source), "adapter": str(data.start) if data.start else None,
                "adapter_digest": _folder_digest(data.start), "system": data.system}
    key = pairing.sampling_key(identity, settings, cfg.seed)
    have = pairing.read_samples(out / pairing.SAMPLES, key)
    if have:
        yield ev.log(f"{len(have)} samples already in {pairing.SAMPLES}: only the rest are "
                     "sampled")
    # the loader chat uses: samples from the model chat serves (eager attention for Gemma)
    model = load_causal_lm(data.model_source, dtype=default_dtype(cuda),
                           model_type=data.model_type,
                           attn_implementation=data.attn_implementation)
    if data.start is not None:
        model = PeftModel.from_pretrained(model, str(data.start), is_trainable=False)
    model.to("cuda" if cuda else "cpu").eval()
    end_ids = end_of_generation_ids(model, data.tokenizer)
    end_ids.setdefault(data.end_id, data.end_text)
    started = time.perf_counter()
    for done, total in pairing.sample(model, data.tokenizer, data.prompts, settings,
                                      seed=cfg.seed, key=key, template=data.template,
                                      system=data.system, end_ids=end_ids,
                                      rules=persona.speech, out=out, cancelled=ctx.cancelled):
        yield ev.progress(done, total, "prompts", stage="pairs")
    del model
    release_memory(cuda)
    ctx.check_cancelled()
    samples = pairing.read_samples(out / pairing.SAMPLES, key)
    if settings.judge:
        yield ev.log(f"judging {len(samples)} samples with {settings.judge} on "
                     f"{', '.join(settings.criteria)} (weight {settings.judge_weight:g})")
        judged = pairing.judge_samples(ctx.workspace, ctx.store, cfg.persona, settings, key,
                                       samples, out)
        yield ev.log(f"{judged['ok']} verdicts, {judged['failed']} failed (those samples keep "
                     f"their style score alone): {out / pairing.JUDGED}")
        summary["judged"] = judged
    pairs, counts = pairing.make_pairs(data.prompts, samples, settings)
    pairing.write_pairs(out / pairing.PAIRS, pairs)
    scores = [s["score"] for s in samples.values()]
    mean = sum(scores) / len(scores) if scores else 0.0
    yield ev.metric("sample_style", mean, stage="pairs")
    yield ev.metric("pairs", len(pairs), stage="pairs")
    yield ev.log(f"{len(samples)} samples (mean style score {mean:.2f}, "
                 f"{time.perf_counter() - started:.0f} s); {len(pairs)} pairs kept of "
                 f"{counts['prompts']} prompts ({counts['below_margin']} below the margin "
                 f"{settings.margin:g}, {counts['too_few']} with fewer than two distinct "
                 f"replies): {out / pairing.PAIRS}")
    summary["pairs"] = {**counts, "samples": len(samples), "mean_style": round(mean, 4),
                        "file": str(out / pairing.PAIRS)}
    if not pairs:
        raise ConfigError(f"pairs: no prompt's replies differ by the margin {settings.margin:g}"
                          f" (see {out / pairing.SAMPLES}); lower margin or raise samples / "
                          "temperature")
    from pipelines.training.preference import check_row

    data.rows = [r for number, p in enumerate(pairs, 1)
                 for r in check_row(p, cfg.method, f"{out / pairing.PAIRS}: row {number}")]
    yield from encode_rows(cfg, data, out)


def _folder_digest(folder: Path | None) -> str | None:
    if folder is None:
        return None
    import hashlib

    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.json")):
        stat = path.stat()
        digest.update(f"{path.name}:{stat.st_size}:{int(stat.st_mtime)}".encode())
    return digest.hexdigest()[:16]


# --- model and trainer ------------------------------------------------------------------


def load_trainer(cfg: PreferJob, base: HFVariant, data: PreferData, out: Path, cuda: bool,
                 summary: dict[str, Any]) -> Generator[Event, None, tuple[Any, Path | None]]:
    yield ev.stage("load", "loading the base model" + (" and the adapter to continue"
                                                        if data.start else ""))
    from pipelines.training.preference import load_policy, make_trainer

    model = load_policy(cfg, data.model_source, data.model_type, data.attn_implementation,
                        data.start, cuda)
    if cfg.gradient_checkpointing and not cuda:
        yield ev.log("gradient_checkpointing is ignored on the CPU", level="warning")
    assert data.train_idx is not None and data.eval_idx is not None
    trainer = make_trainer(cfg, model, data.tokenizer, data.trainer_rows(data.train_idx),
                           data.trainer_rows(data.eval_idx), out, cuda)
    resume = yield from find_checkpoint(cfg, data, out, summary)
    return trainer, resume


def find_checkpoint(cfg: PreferJob, data: PreferData, out: Path,
                    summary: dict[str, Any]) -> Generator[Event, None, Path | None]:
    from pipelines.jobs.train import _digest
    from pipelines.training.trainer import prepare_checkpoints

    assert data.train_idx is not None and data.eval_idx is not None
    fingerprint = {
        "base": str(data.model_source), "start": str(data.start) if data.start else None,
        "start_digest": _folder_digest(data.start),
        "data": _digest(data.trainer_rows(data.train_idx)),
        "eval": _digest(data.trainer_rows(data.eval_idx)),
        "settings": cfg.model_dump(mode="json", include={
            "method", "beta", "lora", "qlora", "epochs", "max_steps", "learning_rate",
            "batch_size", "grad_accum", "max_seq_len", "seed", "save_steps"}
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

# TRL's logged preference figures, as metric names
PREFERENCE_METRICS = {"rewards/margins": "reward_margin", "rewards/accuracies": "reward_accuracy",
                      "rewards/chosen": "reward_chosen", "rewards/rejected": "reward_rejected",
                      "log_odds_ratio": "log_odds_ratio", "kl": "kl"}


def preference_metrics(emit: Any, last: dict[str, float]) -> Any:
    """A trainer callback: TRL's logged preference figures (PREFERENCE_METRICS) emitted as
    metric events, and the latest of each kept in `last` (the summary's)."""
    from transformers import TrainerCallback

    class PreferenceMetrics(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            for key, value in (logs or {}).items():
                name = PREFERENCE_METRICS.get(key.removeprefix("train/"))
                if name and isinstance(value, (int, float)):
                    last[name] = float(value)
                    emit(ev.metric(name, float(value), step=state.global_step, stage="train"))
            return control

    return PreferenceMetrics()


def train(cfg: PreferJob, ctx: JobContext, trainer: Any, resume: Path | None,
          data: PreferData, summary: dict[str, Any]) -> Iterator[Event]:
    """The train job's loop (trainer in a thread, its callback's events yielded), with the
    preference figures TRL logs as metrics too."""
    from pipelines.jobs.trainer_loop import run_training
    from pipelines.training.trainer import EventCallback

    assert data.train_idx is not None
    yield ev.stage("train", f"{len(data.train_idx)} rows, {cfg.method}, up to {cfg.epochs:g} "
                   "epochs")
    events: queue.Queue[Any] = queue.Queue()
    callback = EventCallback(events.put, ctx.cancelled, partial(getattr, trainer, "tokens_seen"))
    last: dict[str, float] = {}
    trainer.add_callback(callback)
    trainer.add_callback(preference_metrics(events.put, last))
    seconds = yield from run_training(trainer, resume, ctx, events, f"kyara-prefer-{cfg.name}")
    state = trainer.state
    summary.update({
        "steps": state.global_step, "epochs": round(float(state.epoch or 0), 3),
        "train_seconds": round(seconds, 1),
        "tokens_per_s": round(trainer.tokens_seen / seconds, 1) if seconds else None,
        "train_loss": callback.last_loss, "eval_loss": callback.last_eval,
        **{k: round(v, 4) for k, v in last.items()},
    })


def train_in_processes(cfg: PreferJob, ctx: JobContext, data: PreferData, out: Path,
                       cuda: bool, summary: dict[str, Any]) -> Generator[Event, None, Any]:
    """`processes` > 1: as the train job's (trainer_loop), from the rows encoded here."""
    from pipelines.jobs import trainer_loop

    assert data.train_idx is not None and data.eval_idx is not None
    resume = yield from find_checkpoint(cfg, data, out, summary)
    spec = {"model_source": str(data.model_source), "model_type": data.model_type,
            "attn_implementation": data.attn_implementation,
            "start": str(data.start) if data.start else None,
            "train_rows": data.trainer_rows(data.train_idx),
            "eval_rows": data.trainer_rows(data.eval_idx)}
    return (yield from trainer_loop.train_in_processes(cfg, ctx, "prefer", out, resume, cuda,
                                                       spec, len(data.train_idx), summary))


# --- save and register ------------------------------------------------------------------


def save_and_register(cfg: PreferJob, ctx: JobContext, trainer: Any, out: Path,
                      summary: dict[str, Any]) -> Generator[Event, None, Path]:
    """The trained adapter alone (not the reference copy) written whole, the resolved config
    beside it, and the variant registered: the base variant's settings with this adapter."""
    yield ev.stage("save", "writing the adapter")
    from pipelines.training.preference import save_adapter

    adapter = out / "adapter"
    tmp = out / f".adapter.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_adapter(trainer.model, tmp)
    _replace_dir(tmp, adapter)
    (out / "config.yaml").write_text(
        f"# resolved config of the run {ctx.run_id} that wrote {adapter.name}/\n"
        + yaml.safe_dump(cfg.model_dump(mode="json"), allow_unicode=True, sort_keys=False),
        encoding="utf-8")
    from pipelines.variants import register, trained_variant, write_variant_yaml

    base = base_variant(ctx, cfg)
    name = variant_name(cfg)
    start = summary.get("start_adapter")
    variant = trained_variant(base, name, adapter,
                              f"{cfg.base} + {cfg.method} from job {cfg.name}"
                              + (f" (continuing {start})" if start else ""))
    variant_yaml = write_variant_yaml(variant, ctx.home,
                                      f"written by the prefer job {cfg.name} (run {ctx.run_id})")
    register(ctx.store, variant, base=cfg.base, run_id=ctx.run_id, yaml_path=variant_yaml)
    yield ev.log(f"variant {name} registered: {variant_yaml}")
    summary.update({"adapter": str(adapter), "variant_yaml": str(variant_yaml)})
    return adapter


# --- before / after ---------------------------------------------------------------------


def before_after(cfg: PreferJob, ctx: JobContext, persona: Persona, data: PreferData,
                 adapter: Path, cuda: bool, out: Path, summary: dict[str, Any]) -> Iterator[Event]:
    """The starting variant vs the trained one, greedy, on the persona's held-out questions:
    figures with Wilson intervals in eval.json and the log."""
    persona_data = ctx.workspace.persona_data(cfg.persona)
    questions = (persona_data.eval if cfg.eval_questions is None
                 else persona_data.eval[:cfg.eval_questions])
    if not questions:
        return
    name = variant_name(cfg)
    yield ev.stage("eval", f"{len(questions)} held-out questions, {cfg.base} vs {name}")
    from pipelines.training.preference import before_after as measure

    report = measure(ctx, cfg, persona, cfg.base, name, data.model_source, data.start, adapter,
                     [q.question for q in questions], data.template, data.end_id, cuda,
                     model_type=data.model_type, attn_implementation=data.attn_implementation)
    facts = fact_hits(questions, report)
    if facts is not None:
        report["intervals"]["before"]["fact_hits"], report["intervals"]["after"]["fact_hits"] = facts
        report["table"] += "\n" + fact_line(*facts)
    (out / "eval.json").write_text(json.dumps(report, ensure_ascii=False, indent=2) + "\n",
                                   encoding="utf-8")
    yield ev.log(f"before / after (greedy, max {cfg.eval_max_new_tokens} new tokens):\n"
                 + report["table"])
    for key in ("ends_maru", "ojousama", "median_chars", "stop_eos"):
        yield ev.metric(f"eval_{key}", report["after"][key], stage="eval")
    summary["mini_eval"] = {k: report[k] for k in ("before", "after", "intervals", "table")}


def fact_hits(questions: list[Any], report: dict[str, Any]) -> tuple[Any, Any] | None:
    """Per side, the replies that state the expected fact (the eval job's `fact_hit`) among
    the questions that have `expect` strings, with Wilson intervals; None without any."""
    from pipelines.evaluation.stats import wilson
    from pipelines.jobs.eval import fact_hit

    rows = [(q, r) for q, r in zip(questions, report["replies"], strict=True) if q.expect]
    if not rows:
        return None
    sides = []
    for side in ("before", "trained"):
        k = sum(fact_hit(r[side]["text"], q.expect) for q, r in rows)
        p = wilson(k, len(rows))
        sides.append({"k": k, "n": len(rows), "rate": p.rate, "low": p.lo, "high": p.hi})
    return sides[0], sides[1]


def fact_line(before: dict[str, Any], after: dict[str, Any]) -> str:
    def show(p: dict[str, Any]) -> str:
        return f"{p['rate']:.0%} [{p['low']:.0%}, {p['high']:.0%}] ({p['k']}/{p['n']})"

    return f"{'fact hits':22}{show(before):>26}{show(after):>26}"
