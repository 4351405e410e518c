"""Transformers models: `generate()` in a thread, text through a TextIteratorStreamer.

- One loaded copy per base model: variants that share a base (one with a LoRA adapter,
  one without) share one copy from a module-level cache keyed on (model, dtype, device,
  attention). Adapters are named PEFT adapters on that copy, selected per request; a
  variant without adapter generates inside `disable_adapter()`. A lock keeps two replies
  from running on one copy at once (the active adapter is per model, not per call).
- The prompt is rendered by pipelines.prompting (sandboxed) with the tokenizer's chat
  template and BOS text, and tokenised with add_special_tokens=False: BOS comes from the
  template, once.
- Generation stops on every end-of-generation id the model declares (generation config,
  tokenizer EOS, `<end_of_turn>`), and within one token of the consumer closing the
  stream (a StoppingCriteria watches a flag that the closed generator sets).

Errors before the first token raise BackendError; an error after text has streamed ends
the stream with an `error` Delta so the partial reply is kept.
"""

from __future__ import annotations

import gc
import hashlib
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoTokenizer,
    StoppingCriteria,
    StoppingCriteriaList,
    TextIteratorStreamer,
)

from pipelines.config import HFVariant
from pipelines.inference.base import (
    BackendError,
    Delta,
    GenerationOptions,
    Message,
    final_delta,
    usable_cores,
)
from pipelines.inference.loading import attention_for
from pipelines.inference.registry import GenerationLock, render_for_model
from pipelines.inference.sources import resolve_path
from pipelines.prompting import GEMMA_TEMPLATE

# --- the shared copies ------------------------------------------------------------------


@dataclass
class SharedModel:
    key: tuple
    model: Any  # a PreTrainedModel, or a PeftModel wrapping it once an adapter is loaded
    tokenizer: Any
    lock: GenerationLock = field(default_factory=GenerationLock)
    adapters: dict[str, str] = field(default_factory=dict)  # adapter dir -> PEFT adapter name
    users: int = 0


_CACHE: dict[tuple, SharedModel] = {}
_CACHE_LOCK = threading.Lock()


def cached_models() -> dict[tuple, Any]:
    """The loaded copies, by (model, dtype, device, attention, 4-bit)."""
    with _CACHE_LOCK:
        return {key: entry.model for key, entry in _CACHE.items()}


def _load(
    key: tuple,
    source: str,
    dtype: torch.dtype,
    device: str,
    attn: str | None,
    load_in_4bit: bool,
    variant: str,
    model_type: str | None = None,
) -> SharedModel:
    from pipelines.inference.loading import load_causal_lm

    quantization = device_map = None
    if load_in_4bit:
        try:
            from transformers import BitsAndBytesConfig

            quantization = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype
            )
            device_map = {"": 0}
        except ImportError as exc:
            raise BackendError(
                f"variant {variant!r}: load_in_4bit needs bitsandbytes ({exc})"
            ) from None
    # Loading reads files the user made: any failure is theirs to fix, said in one line.
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except Exception as exc:
        raise BackendError(
            f"variant {variant!r}: cannot load the tokenizer of {source!r}: {_one_line(exc)}"
        ) from None
    try:
        # the one loader (pipelines.inference.loading): `attn` is already its choice
        model = load_causal_lm(source, dtype=dtype, model_type=model_type,
                               attn_implementation=attn, device=device, device_map=device_map,
                               quantization_config=quantization)
    except Exception as exc:
        raise BackendError(
            f"variant {variant!r}: cannot load model {source!r}: {_one_line(exc)}"
        ) from None
    model.eval()
    return SharedModel(key=key, model=model, tokenizer=tokenizer)


def _release(entry: SharedModel) -> None:
    with _CACHE_LOCK:
        entry.users -= 1
        if entry.users > 0 or _CACHE.get(entry.key) is not entry:
            return
        del _CACHE[entry.key]
    entry.model = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _is_peft(model: Any) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- streaming pieces -------------------------------------------------------------------


class _Streamer(TextIteratorStreamer):
    """Releases text as soon as its characters are complete. The stock streamer holds text
    after punctuation back until a space or a newline, which Japanese seldom has; a
    character still missing bytes decodes to U+FFFD and waits for the next token."""

    def put(self, value: torch.Tensor) -> None:
        if value.dim() > 1:
            value = value[0]
        if self.skip_prompt and self.next_tokens_are_prompt:
            self.next_tokens_are_prompt = False
            return
        self.token_cache.extend(value.tolist())
        text = self.tokenizer.decode(self.token_cache, **self.decode_kwargs).rstrip("\ufffd")
        if len(text) > self.print_len:
            self.on_finalized_text(text[self.print_len :])
            self.print_len = len(text)


class _Watch(StoppingCriteria):
    """Called after every new token: stamps the first one (ttft) and stops on cancel."""

    def __init__(self) -> None:
        self.cancel = threading.Event()
        self.first: float | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        if self.first is None:
            self.first = time.perf_counter()
        return torch.full(
            (input_ids.shape[0],), self.cancel.is_set(), dtype=torch.bool, device=input_ids.device
        )


# --- the backend ------------------------------------------------------------------------


class HFBackend:
    batched = True  # generate_batch: the eval job's single-turn replies, a batch a pass

    def __init__(self, variant: HFVariant, home: Path | None = None) -> None:
        self.variant = variant
        self.name = variant.name
        self.home = Path(home) if home is not None else None
        source = self._source()
        device = self._device()
        dtype = self._dtype(device)
        if device == "cpu":
            # every usable core, as llama.cpp variants get (torch counts the machine's)
            self.n_threads = variant.n_threads or usable_cores()
            torch.set_num_threads(self.n_threads)
        else:
            self.n_threads = None
        try:
            config = AutoConfig.from_pretrained(source)
        except Exception as exc:
            raise BackendError(
                f"variant {self.name!r}: cannot load model {source!r}: {_one_line(exc)}"
            ) from None
        # the loaders' one rule: the variant's choice, else eager for Gemma (Gemma 2's
        # soft-capped attention is only right in the eager implementation)
        attn = attention_for(config.model_type, variant.attn_implementation)
        key = (source, str(dtype), device, attn, variant.load_in_4bit)
        with _CACHE_LOCK:
            entry = _CACHE.get(key)
            if entry is None:
                entry = _load(key, source, dtype, device, attn, variant.load_in_4bit, self.name,
                              config.model_type)
                _CACHE[key] = entry
            entry.users += 1
        self._entry = entry
        self.tokenizer = entry.tokenizer
        self.device = device
        self.context_window: int | None = getattr(config, "max_position_embeddings", None)
        self.last: Delta | None = None  # the final Delta of the latest stream, cancelled ones too
        try:
            self.adapter_name = self._attach_adapter() if variant.adapter else None
            self.eos_ids = self._end_of_generation_ids()
            self.chat_template = self._chat_template(config.model_type)
        except BaseException:
            self.close()  # a variant that failed to set up does not pin the shared copy
            raise

    @property
    def model(self) -> Any:
        """The shared copy (a PeftModel once any variant on this base has an adapter)."""
        return self._entry.model

    # --- set-up -------------------------------------------------------------------------

    def _source(self) -> str:
        from pipelines.inference.sources import resolve_hf_model

        return resolve_hf_model(self.variant.model, self.home, variant=self.name)

    def _device(self) -> str:
        wanted = self.variant.device
        if wanted == "cuda" or self.variant.load_in_4bit:
            if not torch.cuda.is_available():
                what = "load_in_4bit" if self.variant.load_in_4bit else "device: cuda"
                raise BackendError(
                    f"variant {self.name!r}: {what} needs a CUDA GPU and none is visible"
                )
            return "cuda"
        if wanted == "cpu":
            return "cpu"
        return "cuda" if torch.cuda.is_available() else "cpu"

    def _dtype(self, device: str) -> torch.dtype:
        if self.variant.dtype == "auto":
            # bf16 halves GPU memory; on CPU bf16 matmuls are slow and fp32 is exact.
            return torch.bfloat16 if device == "cuda" else torch.float32
        return getattr(torch, self.variant.dtype)

    def _attach_adapter(self) -> str:
        from peft import PeftModel

        path = resolve_path(self.variant.adapter, self.home)
        if not path.is_dir():
            raise BackendError(f"variant {self.name!r}: adapter directory not found: {path}")
        path = path.resolve()
        entry = self._entry
        with entry.lock:  # not while another variant generates on this copy
            if str(path) in entry.adapters:
                return entry.adapters[str(path)]
            # PEFT adapter names become module keys: no dots, so a hash of the path.
            name = "a" + hashlib.sha1(str(path).encode()).hexdigest()[:12]
            try:
                if isinstance(entry.model, PeftModel):
                    entry.model.load_adapter(str(path), adapter_name=name, is_trainable=False)
                else:
                    entry.model = PeftModel.from_pretrained(
                        entry.model, str(path), adapter_name=name, is_trainable=False
                    )
            except Exception as exc:  # a PEFT dir for another base fails in many ways
                raise BackendError(
                    f"variant {self.name!r}: cannot load adapter {path}: {_one_line(exc)}"
                ) from None
            entry.adapters[str(path)] = name
            return name

    def _end_of_generation_ids(self) -> dict[int, str]:
        # Gemma ends a turn with <end_of_turn>; some configs list only <eos>.
        from pipelines.inference.end_of_generation import end_of_generation_ids

        return end_of_generation_ids(self._entry.model, self.tokenizer)

    def _chat_template(self, model_type: str) -> str:
        template = self.tokenizer.chat_template
        if isinstance(template, dict):
            template = template.get("default")
        if template:
            return template
        if model_type.startswith("gemma"):
            return GEMMA_TEMPLATE  # a Gemma base model (e.g. Gemma 3 270M) ships without one
        raise BackendError(
            f"variant {self.name!r}: the tokenizer of {self.variant.model} has no chat template"
        )

    # --- prompt ---------------------------------------------------------------------------

    def render(self, messages: Sequence[Message]) -> str:
        return render_for_model(
            self.chat_template,
            messages,
            bos_token=self.tokenizer.bos_token or "",
            eos_token=self.tokenizer.eos_token or "",
            variant=self.name,
        )

    def tokenize_prompt(self, messages: Sequence[Message]) -> list[int]:
        return self._tokens(self.render(messages))

    def _tokens(self, rendered: str) -> list[int]:
        return self.tokenizer(rendered, add_special_tokens=False)["input_ids"]

    # --- generation -------------------------------------------------------------------

    def _generate_kwargs(self, options: GenerationOptions, budget: int) -> dict[str, Any]:
        pad = self.tokenizer.pad_token_id
        kwargs: dict[str, Any] = {
            "max_new_tokens": budget,
            "eos_token_id": list(self.eos_ids),
            "pad_token_id": pad if pad is not None else next(iter(self.eos_ids), None),
        }
        if options.temperature > 0:
            kwargs.update(
                do_sample=True,
                temperature=options.temperature,
                top_p=options.top_p,
                top_k=options.top_k,
            )
        else:
            # Greedy; the model's own sampling defaults are overridden so they cannot apply.
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if options.repeat_penalty != 1.0:
            kwargs["repetition_penalty"] = options.repeat_penalty
        return kwargs

    def stream(self, messages: Sequence[Message], options: GenerationOptions) -> Iterator[Delta]:
        entry = self._entry
        with entry.lock:
            started = time.perf_counter()
            rendered = self.render(messages)
            prompt = self._tokens(rendered)
            window = self.context_window
            if window and len(prompt) >= window:
                raise BackendError(
                    f"variant {self.name!r}: prompt is {len(prompt)} tokens, the context window "
                    f"is {window} (shorten the conversation)"
                )
            budget = (
                min(options.max_new_tokens, window - len(prompt))
                if window
                else options.max_new_tokens
            )
            model = entry.model
            input_ids = torch.tensor([prompt], device=model.device)
            streamer = _Streamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
            watch = _Watch()
            kwargs = self._generate_kwargs(options, budget)
            kwargs.update(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                streamer=streamer,
                stopping_criteria=StoppingCriteriaList([watch]),
            )
            if self.adapter_name:
                model.set_adapter(self.adapter_name)
                adapter_scope: Any = nullcontext()
            elif _is_peft(model):  # the shared copy carries another variant's adapter
                adapter_scope = model.disable_adapter()
            else:
                adapter_scope = nullcontext()
            result: dict[str, Any] = {}

            def work() -> None:
                try:
                    with adapter_scope:
                        if options.seed is not None:
                            torch.manual_seed(options.seed)
                        result["ids"] = model.generate(**kwargs)
                except BaseException as exc:  # reported by the consumer's thread
                    result["error"] = exc
                    streamer.end()  # unblock the consumer

            thread = threading.Thread(target=work, name=f"kyara-generate-{self.name}", daemon=True)
            thread.start()
            streamed = False
            try:
                for text in streamer:
                    if text:
                        streamed = True
                        yield Delta(text=text)
            except GeneratorExit:
                watch.cancel.set()
                thread.join()
                self.last = self._final("cancel", None, result, prompt, started, watch, rendered)
                raise
            finally:
                thread.join()
            if "error" in result:
                message = f"generation failed: {_one_line(result['error'])}"
                if not streamed:
                    raise BackendError(f"variant {self.name!r}: {message}")
                self.last = self._final("error", message, result, prompt, started, watch,
                                        rendered)
            else:
                self.last = self._final(None, None, result, prompt, started, watch, rendered)
            yield self.last

    def generate_batch(self, conversations: Sequence[Sequence[Message]],
                       options: GenerationOptions, batch_size: int = 8) -> list[Delta]:
        """Replies to many conversations, `batch_size` prompts per `model.generate` (left
        padded): what an evaluation over a question set runs on a GPU instead of one stream
        per question. One final Delta per conversation, in order, with the reply's text in
        `text`, its stop reason (eos / length), token counts and tokens/s of its batch."""
        entry = self._entry
        out: list[Delta] = []
        with entry.lock:
            model = entry.model
            pad = self.tokenizer.pad_token_id
            if pad is None:
                pad = next(iter(self.eos_ids))
            if self.adapter_name:
                model.set_adapter(self.adapter_name)
            for start in range(0, len(conversations), max(1, batch_size)):
                texts = [self.render(m) for m in conversations[start:start + batch_size]]
                prompts = [self._tokens(t) for t in texts]
                width = max(len(p) for p in prompts)
                budget = options.max_new_tokens
                if self.context_window:
                    budget = min(budget, self.context_window - width)
                    if budget <= 0:
                        raise BackendError(f"variant {self.name!r}: a prompt of {width} tokens "
                                           f"fills the context window ({self.context_window})")
                ids = torch.full((len(prompts), width), pad, dtype=torch.long)
                mask = torch.zeros((len(prompts), width), dtype=torch.long)
                for row, prompt in enumerate(prompts):
                    ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
                    mask[row, width - len(prompt):] = 1
                kwargs = self._generate_kwargs(options, budget)
                scope = (model.disable_adapter() if not self.adapter_name and _is_peft(model)
                         else nullcontext())
                started = time.perf_counter()
                with scope, torch.no_grad():
                    if options.seed is not None:
                        torch.manual_seed(options.seed)
                    result = model.generate(input_ids=ids.to(model.device),
                                            attention_mask=mask.to(model.device), **kwargs)
                seconds = time.perf_counter() - started
                rows = result[:, width:].tolist()
                made = sum(next((i + 1 for i, t in enumerate(r) if t in self.eos_ids), len(r))
                           for r in rows)
                for text, prompt, row in zip(texts, prompts, rows, strict=True):
                    cut = next((i for i, t in enumerate(row) if t in self.eos_ids), None)
                    kept = row if cut is None else row[:cut]
                    out.append(Delta(
                        text=self.tokenizer.decode(kept, skip_special_tokens=True), done=True,
                        stop_reason="length" if cut is None else "eos",
                        stop_token=None if cut is None else self.eos_ids[row[cut]],
                        prompt_tokens=len(prompt), completion_tokens=len(kept),
                        tokens_per_s=made / seconds if seconds > 0 else None,
                        extra={"rendered": text}))
        return out

    def _final(
        self,
        reason: str | None,
        error: str | None,
        result: dict[str, Any],
        prompt: list[int],
        started: float,
        watch: _Watch,
        rendered: str | None = None,
    ) -> Delta:
        ended = time.perf_counter()
        out = result["ids"][0, len(prompt) :].tolist() if "ids" in result else []
        stop_token = None
        if reason is None:
            if out and out[-1] in self.eos_ids:
                reason, stop_token = "eos", self.eos_ids[out[-1]]
            else:
                reason = "length"
        return final_delta(reason, stop_token, error, len(prompt), out, started, watch.first,
                           ended, rendered)

    def resident_models(self) -> list[dict[str, Any]]:
        """The copies loaded in this process and their adapters (JSON, for a worker's
        `call`): variants sharing a base show one copy here."""
        with _CACHE_LOCK:
            return [{"key": [str(k) for k in key], "adapters": sorted(entry.adapters),
                     "users": entry.users} for key, entry in _CACHE.items()]

    def close(self) -> None:
        entry, self._entry = getattr(self, "_entry", None), None
        if entry is not None:
            _release(entry)
