"""GGUF models through llama-cpp-python, token by token.

Why a manual loop over `Llama.generate` rather than `create_chat_completion`:
- it stops on every end-of-generation token the GGUF declares (llama.cpp's `is_eog`: for
  Gemma `<eos>`, `<end_of_turn>` and `</s>`) and can say which one stopped it;
- the prompt is rendered by pipelines.prompting (the same text training used), with the
  model's BOS text in the template, then tokenised with add_bos=False and special=True:
  `<start_of_turn>` becomes one control token and BOS is not doubled;
- closing the generator stops generation at once: nothing runs between two yields.

Errors before the first token (no model, a context overflow) raise BackendError; an error
after text has streamed ends the stream with an `error` Delta so the partial reply is kept.
"""

from __future__ import annotations

import codecs
import time
from collections.abc import Iterator, Sequence
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
        try:
            self.llm = llama_cpp.Llama(
                model_path=str(self.model_path),
                n_ctx=variant.n_ctx,
                n_gpu_layers=self.settings["n_gpu_layers"],
                n_threads=self.settings["n_threads"],
                n_threads_batch=self.settings["n_threads"],
                lora_path=str(lora) if lora else None,
                verbose=False,
            )
        except (ValueError, RuntimeError, OSError) as exc:
            detail = " ".join(str(exc).split()) or type(exc).__name__
            raise BackendError(
                f"variant {variant.name!r}: cannot load {self.model_path} "
                f"(a truncated or corrupt GGUF, or one this llama.cpp cannot read): {detail}"
            ) from None
        self._vocab = llama_cpp.llama_model_get_vocab(self.llm.model)
        self.eog_tokens = self._end_of_generation_tokens()
        self._bos_id = self.llm.token_bos()
        self._add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self._vocab)) and self._bos_id >= 0
        self.bos_text = self._token_text(self._bos_id) if self._bos_id >= 0 else ""
        eos_id = self.llm.token_eos()
        self.eos_text = self._token_text(eos_id) if eos_id >= 0 else ""
        self.chat_template = self._chat_template()
        self._lock = GenerationLock()
        self.last: Delta | None = None  # the final Delta of the latest stream, cancelled ones too

    # --- set-up -------------------------------------------------------------------------

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
        ids = self.llm.tokenize(self.render(messages).encode("utf-8"), add_bos=False, special=True)
        # A template without {{ bos_token }} on a model that wants one: add it, as
        # llama.cpp would; never twice.
        if self._add_bos and (not ids or ids[0] != self._bos_id):
            ids.insert(0, self._bos_id)
        return ids

    # --- generation -------------------------------------------------------------------

    def stream(self, messages: Sequence[Message], options: GenerationOptions) -> Iterator[Delta]:
        with self._lock:
            started = time.perf_counter()
            prompt = self.tokenize_prompt(messages)
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
                                        first, time.perf_counter())
                raise
            except (RuntimeError, ValueError, OSError) as exc:  # llama_decode failures
                message = "generation failed: " + (" ".join(str(exc).split()) or type(exc).__name__)
                if not tokens:
                    raise BackendError(f"variant {self.name!r}: {message}") from None
                stop_reason, error = "error", message
            finally:
                steps.close()
            self.last = final_delta(stop_reason, stop_token, error, len(prompt), tokens, started,
                                    first, time.perf_counter())
            yield self.last

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is not None:
            llm.close()
