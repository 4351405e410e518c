"""Preference training (the `prefer` job): preference files read and checked, pairs turned
into the exact ids the train job builds, TRL's DPO / KTO / ORPO trainers fed those ids, and
the before / after measure.

Ids: every (prompt, reply) is tokenised by `pipelines.training.examples.tokenize`, the train
job's one path (the prompt rendered with the model's chat template as inference renders it,
system text folded for Gemma, the completion = the reply and its turn terminator), and each
sequence passes the train job's label check (the terminator trained in the chosen and the
rejected completion alike). TRL gets the ids ready-made: DPO and KTO skip their own
tokenisation when the rows already carry `prompt_ids` (our `_prepare_dataset`), ORPO's
`tokenize_row` returns ours. tests/training/test_prefer_ids.py shows they equal TRL's own
tokenisation on the Gemma template (DPO, KTO); TRL's ORPO appends an EOS after Gemma's
`<end_of_turn>\n`, which kyara does not: generation stops at the terminator, so the ids
end where inference ends.

Reference model: training continues a PEFT adapter (a fresh LoRA on a plain base, or a copy
of the SFT adapter); DPO and KTO then keep a frozen copy of the starting adapter as the
reference ("ref", made by TRL), so the reference is the model training starts from, not the
bare base. ORPO has no reference.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.config import ConfigError
from pipelines.files import read_jsonl_lines
from pipelines.training.examples import IGNORE, Example, tokenize, with_system

PAIRED = ("dpo", "orpo")


# --- reading and checking a preference file ---------------------------------------------


def _message(value: Any, where: str, side: str) -> dict[str, str]:
    if not isinstance(value, dict) or not isinstance(value.get("role"), str):
        raise ConfigError(f"{where}: {side}: expected a message {{role, content}}, found "
                          f"{json.dumps(value, ensure_ascii=False)[:80]}")
    content = value.get("content")
    if not isinstance(content, str):
        raise ConfigError(f"{where}: {side}: content: expected a string, found "
                          f"{type(content).__name__}")
    return {"role": value["role"], "content": content}


def _prompt(row: dict[str, Any], where: str) -> list[dict[str, str]]:
    prompt = row.get("prompt")
    if prompt is None:
        raise ConfigError(f"{where}: prompt: missing (a list of messages ending on the user's "
                          "turn)")
    if not isinstance(prompt, list) or not prompt:
        raise ConfigError(f"{where}: prompt: expected a non-empty list of messages")
    messages = [_message(m, where, f"prompt[{i}]") for i, m in enumerate(prompt)]
    if messages[-1]["role"] != "user":
        raise ConfigError(f"{where}: prompt: must end on the user's turn; it ends on "
                          f"{messages[-1]['role']!r}")
    return messages


def _reply(row: dict[str, Any], key: str, where: str) -> dict[str, str]:
    value = row.get(key)
    if value is None:
        raise ConfigError(f"{where}: {key}: missing")
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or len(value) != 1:
        raise ConfigError(f"{where}: {key}: expected one assistant message (a list of one)")
    message = _message(value[0], where, key)
    if message["role"] != "assistant":
        raise ConfigError(f"{where}: {key}: expected role 'assistant', found "
                          f"{message['role']!r}")
    if not message["content"].strip():
        raise ConfigError(f"{where}: {key}: the reply is empty")
    return message


def check_row(row: Any, method: str, where: str) -> list[dict[str, Any]]:
    """One row of a preference file, checked, as the rows the method trains on (a pair
    read for KTO becomes two rows: chosen desirable, rejected not)."""
    if not isinstance(row, dict):
        raise ConfigError(f"{where}: expected a JSON object")
    prompt = _prompt(row, where)
    ident = str(row.get("id", where.rsplit(" ", 1)[-1]))
    paired = "chosen" in row or "rejected" in row
    if method in PAIRED or paired:
        if method in PAIRED and "completion" in row:
            raise ConfigError(f"{where}: {method} needs chosen and rejected, found an "
                              "unpaired row (prompt, completion, label): use method: kto")
        chosen, rejected = _reply(row, "chosen", where), _reply(row, "rejected", where)
        if method in PAIRED:
            return [{"id": ident, "prompt": prompt, "chosen": chosen, "rejected": rejected}]
        return [{"id": f"{ident}+", "prompt": prompt, "completion": chosen, "label": True},
                {"id": f"{ident}-", "prompt": prompt, "completion": rejected, "label": False}]
    completion = _reply(row, "completion", where)
    label = row.get("label")
    if not isinstance(label, bool):
        raise ConfigError(f"{where}: label: expected true or false, found "
                          f"{json.dumps(label)}")
    return [{"id": ident, "prompt": prompt, "completion": completion, "label": label}]


def read_preferences(path: str | Path, method: str) -> list[dict[str, Any]]:
    """Every row of a JSON Lines preference file, checked (ConfigError, one line naming the
    file and the row); no model or tokenizer is needed."""
    path = Path(path)
    try:
        lines = read_jsonl_lines(path)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the preference file: {exc.strerror}") from None
    rows: list[dict[str, Any]] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}: row {number}"
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{where}: not JSON ({exc.msg})") from None
        rows.extend(check_row(data, method, where))
    if not rows:
        raise ConfigError(f"{path}: no preference rows")
    if method == "kto" and len({r["label"] for r in rows}) < 2:
        raise ConfigError(f"{path}: kto needs desirable and undesirable rows (label true and "
                          "false); all are " + str(rows[0]["label"]).lower())
    return rows


# --- ids -------------------------------------------------------------------------------


@dataclass
class Encoded:
    """The trainer rows of one method, and every (prompt, reply) sequence as an Example (for
    the label check and the memory estimate), `sequences[i]` belonging to `row_of[i]`."""

    rows: list[dict[str, Any]]
    sequences: list[Example]
    row_of: list[int]


def encode_reply(tokenizer: Any, template: str, prompt: Sequence[dict[str, Any]],
                 reply: dict[str, Any] | list[dict[str, Any]], system: str | None,
                 max_len: int | None,
                 end_text: str) -> Example:
    """One prompt and reply (a message, or a list of one as in a preference file) as the
    train job tokenises a conversation."""
    if isinstance(reply, list):
        reply = reply[0]
    return tokenize(tokenizer, template, with_system([*prompt, reply], system), max_len,
                    end_text)


def split_ids(example: Example) -> tuple[list[int], list[int]]:
    cut = min(example.prompt_tokens, len(example.input_ids))
    return example.input_ids[:cut], example.input_ids[cut:]


def encode(rows: Sequence[dict[str, Any]], method: str, tokenizer: Any, template: str,
           system: str | None, max_len: int, end_text: str) -> Encoded:
    out = Encoded([], [], [])
    for index, row in enumerate(rows):
        if method in PAIRED:
            chosen = encode_reply(tokenizer, template, row["prompt"], row["chosen"], system,
                                  max_len, end_text)
            rejected = encode_reply(tokenizer, template, row["prompt"], row["rejected"], system,
                                    max_len, end_text)
            prompt_ids, chosen_ids = split_ids(chosen)
            _, rejected_ids = split_ids(rejected)
            if method == "dpo":
                out.rows.append({"prompt_ids": prompt_ids, "chosen_ids": chosen_ids,
                                 "rejected_ids": rejected_ids})
            else:  # ORPO's tokenize_row reads these (see KyaraORPOTrainer)
                out.rows.append({"prompt": "", "chosen": "", "rejected": "",
                                 "kyara_prompt": prompt_ids, "kyara_chosen": chosen_ids,
                                 "kyara_rejected": rejected_ids})
            out.sequences += [chosen, rejected]
            out.row_of += [index, index]
        else:
            example = encode_reply(tokenizer, template, row["prompt"], row["completion"], system,
                                   max_len, end_text)
            prompt_ids, completion_ids = split_ids(example)
            out.rows.append({"prompt_ids": prompt_ids, "completion_ids": completion_ids,
                             "label": bool(row["label"])})
            out.sequences.append(example)
            out.row_of.append(index)
    return out


# --- trainers ---------------------------------------------------------------------------


def _count_tokens(inputs: dict[str, Any]) -> int:
    return sum(int(v.sum()) for k, v in inputs.items()
               if k.endswith("attention_mask") and not k.startswith("prompt")
               and hasattr(v, "sum"))


def trainer_classes() -> dict[str, type]:
    """The trainer class per method (imported on demand: TRL's ORPO is experimental)."""
    from trl import DPOTrainer, KTOTrainer
    from trl.experimental.orpo import ORPOTrainer

    class KyaraDPOTrainer(DPOTrainer):
        """DPOTrainer on kyara's ids (rows with prompt_ids / chosen_ids / rejected_ids)."""

        tokens_seen = 0

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            if "prompt_ids" in dataset.column_names:
                return dataset
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if model.training:
                self.tokens_seen += _count_tokens(inputs)
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    class KyaraKTOTrainer(KTOTrainer):
        """KTOTrainer on kyara's ids (rows with prompt_ids / completion_ids / label); the KL
        completions are TRL's (each completion rotated by one within its batch)."""

        tokens_seen = 0

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            if "prompt_ids" not in dataset.column_names:
                return super()._prepare_dataset(dataset, processing_class, args, dataset_name)
            if self.calculate_KL:
                def rotate(batch: dict[str, Any]) -> dict[str, Any]:
                    batch["KL_completion_ids"] = ([batch["completion_ids"][-1]]
                                                  + batch["completion_ids"][:-1])
                    return batch

                dataset = dataset.map(rotate, batched=True,
                                      batch_size=args.per_device_train_batch_size)
            return dataset

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if model.training:
                self.tokens_seen += _count_tokens(inputs)
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    class KyaraORPOTrainer(ORPOTrainer):
        """ORPOTrainer on kyara's ids: `tokenize_row` returns them instead of re-tokenising
        text."""

        tokens_seen = 0

        def tokenize_row(self, feature, model=None):
            prompt, chosen, rejected = (feature["kyara_prompt"], feature["kyara_chosen"],
                                        feature["kyara_rejected"])
            batch = {"prompt_input_ids": list(prompt), "prompt_attention_mask": [1] * len(prompt)}
            for side, ids in (("chosen", chosen), ("rejected", rejected)):
                batch[f"{side}_input_ids"] = list(prompt) + list(ids)
                batch[f"{side}_attention_mask"] = [1] * (len(prompt) + len(ids))
                batch[f"{side}_labels"] = [IGNORE] * len(prompt) + list(ids)
            return batch

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if model.training:
                self.tokens_seen += _count_tokens(inputs)
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    return {"dpo": KyaraDPOTrainer, "kto": KyaraKTOTrainer, "orpo": KyaraORPOTrainer}


def load_policy(cfg: Any, model_source: Path | str, model_type: str,
                attn_implementation: str | None, start_adapter: Path | None, cuda: bool) -> Any:
    """The base model with the adapter to train: a copy of `start_adapter` (the folder is
    only read), else a fresh LoRA from `cfg.lora`. bf16 on CUDA (4-bit with qlora), fp32 on
    the CPU, as the train job loads it."""
    from peft import LoraConfig, PeftModel, get_peft_model

    from pipelines.training.trainer import load_base_model

    model = load_base_model(cfg, model_source, model_type, attn_implementation, cuda)
    if start_adapter is not None:
        return PeftModel.from_pretrained(model, str(start_adapter), is_trainable=True)
    lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=cfg.lora.target_modules, task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def make_trainer(cfg: Any, model: Any, tokenizer: Any, train_rows: list[dict[str, Any]],
                 eval_rows: list[dict[str, Any]], out: Path, cuda: bool) -> Any:
    """The method's trainer (kyara's subclass) on ready-made ids; checkpoints under
    out/checkpoints every save_steps."""
    from datasets import Dataset

    from pipelines.training.trainer import common_arguments

    common: dict[str, Any] = {**common_arguments(cfg, out, cuda, bool(eval_rows)),
                              "beta": cfg.beta}
    if cfg.method == "dpo":
        from trl import DPOConfig

        args = DPOConfig(**common, precompute_ref_log_probs=False)
    elif cfg.method == "kto":
        from trl import KTOConfig

        args = KTOConfig(**common, train_sampling_strategy="sequential")
    else:
        from trl.experimental.orpo import ORPOConfig

        args = ORPOConfig(**common, remove_unused_columns=False)
    cls = trainer_classes()[cfg.method]
    return cls(model=model, args=args, train_dataset=Dataset.from_list(train_rows),
               eval_dataset=Dataset.from_list(eval_rows) if eval_rows else None,
               processing_class=tokenizer)


def save_adapter(model: Any, folder: Path, state: dict[str, Any] | None = None) -> None:
    """Only the trained adapter ("default"), not DPO / KTO's frozen reference copy; from
    `state` (a full state dict, as FSDP gathers it) when given."""
    model.save_pretrained(str(folder), selected_adapters=["default"], state_dict=state)


# --- before / after ---------------------------------------------------------------------

CI_FIGURES = (("ends_maru", "ends with 。"), ("ojousama", "persona endings"),
              ("sentences", "one sentence"), ("stop_eos", "stop on end-of-turn"))


def with_intervals(fig: Any) -> dict[str, Any]:
    """The rates of a Figures as Wilson 95% intervals (k of n)."""
    from pipelines.evaluation.stats import wilson

    out: dict[str, Any] = {}
    for key, _ in CI_FIGURES:
        rate = fig.checks.get("sentences", 0.0) if key == "sentences" else getattr(fig, key)
        k = round(rate * fig.n)
        p = wilson(k, fig.n)
        out[key] = None if p is None else {"k": k, "n": fig.n, "rate": p.rate, "low": p.lo,
                                           "high": p.hi}
    out["median_chars"] = fig.median_chars
    return out


def interval_table(before: dict[str, Any], after: dict[str, Any], names: tuple[str, str]) -> str:
    def show(p: dict[str, Any] | None) -> str:
        if p is None:
            return "n/a"
        return f"{p['rate']:.0%} [{p['low']:.0%}, {p['high']:.0%}] ({p['k']}/{p['n']})"

    width = 26
    lines = [f"{'(Wilson 95% CI)':22}{names[0]:>{width}}{names[1]:>{width}}"]
    for key, label in CI_FIGURES:
        lines.append(f"{label:22}{show(before[key]):>{width}}{show(after[key]):>{width}}")
    lines.append(f"{'median length (chars)':22}{before['median_chars']:>{width}g}"
                 f"{after['median_chars']:>{width}g}")
    return "\n".join(lines)


def before_after(ctx: Any, cfg: Any, persona: Any, before_name: str, after_name: str,
                 model_source: Path | str, start_adapter: Path | None, adapter: Path,
                 questions: list[str], template: str, end_id: int, cuda: bool, *,
                 model_type: str | None = None, attn_implementation: str | None = None
                 ) -> dict[str, Any]:
    """The variant training started from (its adapter, or the bare base) and the trained
    one, greedy on the same questions through pipelines.evaluation; one loaded base, the two
    adapters switched."""
    from dataclasses import asdict

    from peft import PeftModel
    from transformers import AutoTokenizer

    from pipelines.evaluation import end_of_generation_ids, figures, generate, table
    from pipelines.inference.loading import default_dtype, load_causal_lm
    from pipelines.training.mini_eval import TARGETS, _judge

    tokenizer = AutoTokenizer.from_pretrained(model_source)
    model = load_causal_lm(model_source, dtype=default_dtype(cuda), model_type=model_type,
                           attn_implementation=attn_implementation)
    model = PeftModel.from_pretrained(model, str(adapter), adapter_name="trained",
                                      is_trainable=False)
    if start_adapter is not None:
        model.load_adapter(str(start_adapter), adapter_name="before", is_trainable=False)
    model.to("cuda" if cuda else "cpu").eval()
    end_ids = end_of_generation_ids(model, tokenizer)
    end_ids.setdefault(end_id, tokenizer.convert_ids_to_tokens(end_id))
    how = {"template": template, "system": persona.prompts.system if cfg.system_prompt else None,
           "max_new_tokens": cfg.eval_max_new_tokens, "end_ids": end_ids}
    if start_adapter is not None:
        model.set_adapter("before")
        before_replies = generate(model, tokenizer, questions, **how)
    else:
        with model.disable_adapter():
            before_replies = generate(model, tokenizer, questions, **how)
    model.set_adapter("trained")
    after_replies = generate(model, tokenizer, questions, **how)
    del model
    before = figures(before_name, before_replies, persona.speech)
    after = figures(after_name, after_replies, persona.speech)
    _judge(ctx, cfg, questions, before, before_replies, after, after_replies)
    ci_before, ci_after = with_intervals(before), with_intervals(after)
    return {
        "before": before.to_dict(), "after": after.to_dict(),
        "intervals": {"before": ci_before, "after": ci_after},
        "table": table(before, after, TARGETS) + "\n\n"
        + interval_table(ci_before, ci_after, (before_name, after_name)),
        "replies": [{"question": q, "before": asdict(b), "trained": asdict(a)}
                    for q, b, a in zip(questions, before_replies, after_replies, strict=True)],
    }
