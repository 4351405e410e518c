"""GGUF models through llama-cpp-python, token by token.

Why a manual loop over `Llama.generate` rather than `create_chat_completion`:
- it stops on every end-of-generation token the GGUF declares (llama.cpp's `is_eog`: for
  Gemma `<eos>`, `<end_of_turn>` and `</s>`) and can say which one stopped it;
- the prompt is rendered by pipelines.prompting (the same text training used), with the
  model's BOS text in the template, then tokenised with add_bos=False and special=True:
  `<start_of_turn>` becomes one control token and BOS is not doubled;
- closing the generator stops generation at once: nothing runs between two yields.

One `Llama` per base file: variants on the same model file with the same n_ctx, GPU
layers and threads share one loaded model and context from a module-level cache, and a
variant's LoRA is a llama.cpp adapter on it (`llama_adapter_lora_init`), set on the context
per request (`llama_set_adapters_lora`; none for the plain base). On a switch the context
is reset, so no key/value entry made under one adapter (llama-cpp-python reuses the longest
common prompt prefix) is read under another. A lock keeps two replies off one context.

Errors before the first token (no model, a context overflow) raise BackendError; an error
after text has streamed ends the stream with an `error` Delta so the partial reply is kept.
"""

from __future__ import annotations

import codecs
import ctypes
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.config import GGUFVariant
from pipelines.inference.base import (
    BackendError,
    Delta,
    GenerationOptions,
    Message,
    final_delta,
    usable_cores,
)
from pipelines.inference.embedded import ensure_embedded
from pipelines.inference.llama_logs import route_llama_logs
from pipelines.inference.registry import GenerationLock, render_for_model
from pipelines.inference.sources import resolve_path
from pipelines.prompting import resolve_template


def engine_settings(variant: GGUFVariant, llama_cpp: Any) -> dict[str, Any]:
    """What a user expects unless the variant says otherwise: every usable core (llama-cpp-
    python's own default is half of them, 0.58x the decode speed on 2 cores), and every
    layer on the GPU when this llama.cpp build can offload (a CUDA build on the lab's
    server), none otherwise."""
    offload = bool(llama_cpp.llama_supports_gpu_offload())
    return {
        "n_threads": variant.n_threads or usable_cores(),
        "n_threads_source": "variant" if variant.n_threads else "usable cores",
        "n_gpu_layers": variant.n_gpu_layers if variant.n_gpu_layers is not None
        else (-1 if offload else 0),
        "n_gpu_layers_source": "variant" if variant.n_gpu_layers is not None
        else ("all: GPU build" if offload else "none: CPU build"),
        "gpu_offload": offload,
    }


def model_file(variant: GGUFVariant, home: Path | None) -> Path:
    """The variant's .gguf file: its `path` (from the home when relative) or its embedded
    model (assembled on first use); BackendError when there is none."""
    if variant.embedded:
        if home is None:
            raise BackendError(f"variant {variant.name!r}: an embedded model needs the kyara home")
        path = ensure_embedded(variant.embedded, home)
    else:
        path = resolve_path(variant.path, home)
    if not path.is_file():
        raise BackendError(f"variant {variant.name!r}: model file not found: {path}")
    return path


@dataclass
class SharedLlama:
    key: tuple
    llm: Any  # llama_cpp.Llama, loaded without a LoRA
    lock: GenerationLock = field(default_factory=GenerationLock)
    adapters: dict[str, Any] = field(default_factory=dict)  # LoRA file -> its adapter
    adapter_users: dict[str, int] = field(default_factory=dict)
    active: str | None = None  # the LoRA file set on the context now (None: the base)
    users: int = 0


_SHARED: dict[tuple, SharedLlama] = {}
_SHARED_LOCK = threading.Lock()


def shared_models() -> dict[tuple, list[str]]:
    """The loaded Llamas, by (model file, n_ctx, GPU layers, threads): their LoRA files."""
    with _SHARED_LOCK:
        return {key: sorted(entry.adapters) for key, entry in _SHARED.items()}


class GGUFBackend:
    def __init__(self, variant: GGUFVariant, home: Path | None = None) -> None:
        import llama_cpp

        route_llama_logs(llama_cpp)
        self._llama_cpp = llama_cpp
        self.variant = variant
        self.name = variant.name
        self.home = Path(home) if home is not None else None
        self.model_path = model_file(variant, self.home)
        lora = resolve_path(variant.lora_path, self.home) if variant.lora_path else None
        if lora is not None and not lora.is_file():
            raise BackendError(f"variant {variant.name!r}: LoRA file not found: {lora}")
        self.settings = engine_settings(variant, llama_cpp)
        key = (str(self.model_path.resolve()), variant.n_ctx, self.settings["n_gpu_layers"],
               self.settings["n_threads"])
        with _SHARED_LOCK:
            entry = _SHARED.get(key)
            if entry is None:
                entry = SharedLlama(key=key, llm=self._open(llama_cpp))
                _SHARED[key] = entry
            entry.users += 1
        self._entry = entry
        self.llm = entry.llm
        self.lora: str | None = None
        self._lock = entry.lock
        try:
            if lora is not None:
                self._attach_lora(str(lora.resolve()))
            self._vocab = llama_cpp.llama_model_get_vocab(self.llm.model)
            self.eog_tokens = self._end_of_generation_tokens()
            self._bos_id = self.llm.token_bos()
            self._add_bos = (bool(llama_cpp.llama_vocab_get_add_bos(self._vocab))
                             and self._bos_id >= 0)
            self.bos_text = self._token_text(self._bos_id) if self._bos_id >= 0 else ""
            eos_id = self.llm.token_eos()
            self.eos_text = self._token_text(eos_id) if eos_id >= 0 else ""
            self.chat_template = self._chat_template()
        except BaseException:
            self.close()  # a variant that failed to set up does not pin the shared model
            raise
        self.last: Delta | None = None  # the final Delta of the latest stream, cancelled ones too

    # --- set-up -------------------------------------------------------------------------

    def _open(self, llama_cpp: Any) -> Any:
        try:
            return llama_cpp.Llama(
                model_path=str(self.model_path),
                n_ctx=self.variant.n_ctx,
                n_gpu_layers=self.settings["n_gpu_layers"],
                n_threads=self.settings["n_threads"],
                n_threads_batch=self.settings["n_threads"],
                verbose=False,
            )
        except (ValueError, RuntimeError, OSError) as exc:
            detail = " ".join(str(exc).split()) or type(exc).__name__
            raise BackendError(
                f"variant {self.name!r}: cannot load {self.model_path} "
                f"(a truncated or corrupt GGUF, or one this llama.cpp cannot read): {detail}"
            ) from None

    def _attach_lora(self, path: str) -> None:
        entry = self._entry
        with entry.lock:  # not while another variant generates on this context
            if path not in entry.adapters:
                adapter = self._llama_cpp.llama_adapter_lora_init(self.llm.model,
                                                                  path.encode("utf-8"))
                if not adapter:
                    raise BackendError(
                        f"variant {self.name!r}: cannot load LoRA {path} on "
                        f"{self.model_path.name} (a LoRA GGUF for another base model, or a "
                        "file this llama.cpp cannot read)")
                entry.adapters[path] = adapter
            entry.adapter_users[path] = entry.adapter_users.get(path, 0) + 1
            self.lora = path

    def _select_adapter(self) -> None:
        """This variant's LoRA (or none) on the shared context, under its lock; the context
        is reset on a change, so the next prompt is evaluated whole under it."""
        entry = self._entry
        if entry.active == self.lora:
            return
        llama_cpp = self._llama_cpp
        if self.lora is None:
            failed = llama_cpp.llama_set_adapters_lora(self.llm.ctx, None, 0, None)
        else:
            adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(entry.adapters[self.lora])
            scales = (ctypes.c_float * 1)(1.0)
            failed = llama_cpp.llama_set_adapters_lora(self.llm.ctx, adapters, 1, scales)
        entry.active = None  # unknown until set: a failed call leaves no claim behind
        self.llm.reset()
        if failed:
            raise BackendError(f"variant {self.name!r}: llama.cpp could not set "
                               f"{'its LoRA' if self.lora else 'the base model'} on the context")
        entry.active = self.lora

    def _token_text(self, token: int) -> str:
        return self.llm.detokenize([token], special=True).decode("utf-8", errors="replace")

    def _end_of_generation_tokens(self) -> dict[int, str]:
        # A scan of the whole vocabulary (~0.1 s for Gemma's 262k): llama.cpp knows the
        # EOG set but has no call that lists it.
        is_eog = self._llama_cpp.llama_vocab_is_eog
        count = self._llama_cpp.llama_vocab_n_tokens(self._vocab)
        return {t: self._token_text(t) for t in range(count) if is_eog(self._vocab, t)}

    def _chat_template(self) -> str:
        """The variant's template when it names one (the user said so), else the GGUF's own."""
        source = self.variant.chat_template
        if source is None:
            source = self.llm.metadata.get("tokenizer.chat_template")
            if not source:
                raise BackendError(
                    f"variant {self.name!r}: {self.model_path.name} has no chat template in its "
                    "metadata; set chat_template: (gemma, a .jinja file, or inline Jinja)"
                )
            return source
        if source.endswith(".jinja") and "\n" not in source:
            path = resolve_path(source, self.home)
            try:
                return path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise BackendError(
                    f"variant {self.name!r}: cannot read chat template {path}: {exc}"
                ) from None
        return resolve_template(source)

    # --- prompt ---------------------------------------------------------------------------

    def render(self, messages: Sequence[Message]) -> str:
        return render_for_model(
            self.chat_template,
            messages,
            bos_token=self.bos_text,
            eos_token=self.eos_text,
            variant=self.name,
        )

    def tokenize_prompt(self, messages: Sequence[Message]) -> list[int]:
        return self._tokens(self.render(messages))

    def _tokens(self, rendered: str) -> list[int]:
        ids = self.llm.tokenize(rendered.encode("utf-8"), add_bos=False, special=True)
        # A template without {{ bos_token }} on a model that wants one: add it, as
        # llama.cpp would; never twice.
        if self._add_bos and (not ids or ids[0] != self._bos_id):
            ids.insert(0, self._bos_id)
        return ids

    # --- generation -------------------------------------------------------------------

    def stream(self, messages: Sequence[Message], options: GenerationOptions) -> Iterator[Delta]:
        with self._lock:
            started = time.perf_counter()
            self._select_adapter()
            rendered = self.render(messages)
            prompt = self._tokens(rendered)
            n_ctx = self.llm.n_ctx()
            if len(prompt) >= n_ctx:
                raise BackendError(
                    f"variant {self.name!r}: prompt is {len(prompt)} tokens, the context window "
                    f"is {n_ctx} (shorten the conversation or raise n_ctx)"
                )
            budget = min(options.max_new_tokens, n_ctx - len(prompt))
            seed = options.seed if options.seed is not None else self._llama_cpp.LLAMA_DEFAULT_SEED
            self.llm.set_seed(seed)  # the sampler is built by generate() from this seed
            tokens: list[int] = []
            stop_reason, stop_token, error = "length", None, None
            first: float | None = None
            # Japanese characters are 3 UTF-8 bytes, often split over byte-fallback tokens:
            # text is released only once a character is complete.
            decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
            steps = self.llm.generate(
                prompt,
                temp=options.temperature,  # 0 -> llama.cpp's greedy sampler
                top_k=options.top_k,
                top_p=options.top_p,
                min_p=0.0,  # llama.cpp's default 0.05 would make it differ from the hf backend
                repeat_penalty=options.repeat_penalty,
            )
            try:
                for token in steps:
                    first = first or time.perf_counter()
                    tokens.append(token)
                    if token in self.eog_tokens:
                        stop_reason, stop_token = "eos", self.eog_tokens[token]
                        break
                    text = decoder.decode(self.llm.detokenize([token]))
                    if text:
                        yield Delta(text=text)
                    if len(tokens) >= budget:
                        break
                tail = decoder.decode(b"", final=True)
                if tail:
                    yield Delta(text=tail)
            except GeneratorExit:
                self.last = final_delta("cancel", None, None, len(prompt), tokens, started,
                                        first, time.perf_counter(), rendered)
                raise
            except (RuntimeError, ValueError, OSError) as exc:  # llama_decode failures
                message = "generation failed: " + (" ".join(str(exc).split()) or type(exc).__name__)
                if not tokens:
                    raise BackendError(f"variant {self.name!r}: {message}") from None
                stop_reason, error = "error", message
            finally:
                steps.close()
            self.last = final_delta(stop_reason, stop_token, error, len(prompt), tokens, started,
                                    first, time.perf_counter(), rendered)
            yield self.last

    def resident_models(self) -> list[dict[str, Any]]:
        """The Llamas loaded in this process and their LoRAs (JSON, for a worker's `call`):
        variants sharing a base file show one here."""
        with _SHARED_LOCK:
            return [{"key": [str(k) for k in key], "adapters": sorted(entry.adapters),
                     "users": entry.users} for key, entry in _SHARED.items()]

    def close(self) -> None:
        """This variant's share: its LoRA freed when no other variant uses it, the model
        when it was the last user."""
        entry, self._entry = getattr(self, "_entry", None), None
        if entry is None:
            return
        lora, self.lora = getattr(self, "lora", None), None
        if lora is not None:
            with entry.lock:
                entry.adapter_users[lora] -= 1
                if entry.adapter_users[lora] == 0:
                    del entry.adapter_users[lora]
                    if entry.active == lora:
                        self._llama_cpp.llama_set_adapters_lora(entry.llm.ctx, None, 0, None)
                        entry.active = None
                        entry.llm.reset()
                    self._llama_cpp.llama_adapter_lora_free(entry.adapters.pop(lora))
        with _SHARED_LOCK:
            entry.users -= 1
            if entry.users > 0 or _SHARED.get(entry.key) is not entry:
                return
            del _SHARED[entry.key]
        for adapter in entry.adapters.values():  # before the model they belong to
            self._llama_cpp.llama_adapter_lora_free(adapter)
        entry.adapters.clear()
        entry.llm.close()
