"""Any OpenAI-compatible chat endpoint (OpenAI, vLLM, llama.cpp server, Ollama) as a chat
model, through the official `openai` client.

- The key is read from the variant's `api_key_env` only; a local server without one gets
  a placeholder. No retries: a chat reply that silently waits through back-offs feels
  hung, and the user can press send again.
- Token counts come from the server's usage chunk (`stream_options.include_usage`); a
  server that rejects that option is asked again without it, and counts stay unknown.
- Cancel closes the HTTP stream, so the server stops generating too.
- The system prompt: servers that apply a template without a system role (Gemma 2 on vLLM
  answers 400 "System role not supported", llama.cpp's server 500) get the system text
  folded into the first user turn, by `prompting.fold_system`, the folding the hf and gguf
  backends do. `system_prompt: fold` always folds; `auto` (the default) sends it natively
  until such a refusal, then retries once folded and folds from then on for that server and
  model in this process; the final Delta's `extra` says so (`notice`) and carries what was
  really sent (`rendered`). llama.cpp's server renders the template inside its stream, so
  there the refusal is a 200 stream that ends or drops before any text: such a stream is
  asked again once, not streamed, to see the error (any error found so is the one-line
  BackendError).
- Errors never carry the API key: a 401 says which variable the key came from, nothing
  of the server's text (OpenAI's 401 echoes part of the key), and every message is
  scrubbed of the key before it leaves.

Errors before the first text raise BackendError; an error after text has streamed ends
the stream with an `error` Delta so the partial reply is kept.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import openai

from pipelines.config import OpenAIVariant
from pipelines.inference.base import BackendError, Delta, GenerationOptions, Message
from pipelines.prompting import fold_system

_NO_KEY = "sk-no-key-required"  # local servers ignore the key, but the client wants one
_FINISH = {"stop": "eos", "length": "length", "tool_calls": "eos", "function_call": "eos"}
# A template's refusal of the system role, as vLLM (400), llama.cpp's server (500) and
# others word it: "System role not supported", "system messages are not allowed", ...
_SYSTEM_REFUSED = re.compile(r"\bsystem[ _-]?(role|message|prompt)s?\b|\brole\b.{0,20}\bsystem\b",
                             re.IGNORECASE)
_REFUSAL_STATUS = {400, 422, 500}
# (base_url, model) of the servers that refused a system message in this process: every
# backend on them folds from then on (the console's, compare's and the eval job's alike)
_FOLDED: set[tuple[str | None, str]] = set()


def refuses_system_role(exc: BaseException) -> bool:
    """Whether an API error is a chat template refusing the system role."""
    return (isinstance(exc, openai.APIStatusError) and exc.status_code in _REFUSAL_STATUS
            and bool(_SYSTEM_REFUSED.search(_server_message(exc))))


@dataclass
class _Reading:
    """What a stream has said so far."""

    finish: str | None = None
    usage: Any = None
    first: float | None = None


class OpenAIBackend:
    def __init__(self, variant: OpenAIVariant) -> None:
        self.variant = variant
        self.name = variant.name
        self.where = variant.base_url or "the OpenAI API"
        key = os.environ.get(variant.api_key_env) if variant.api_key_env else None
        if not key and variant.base_url is None:
            raise BackendError(
                f"variant {self.name!r}: set {variant.api_key_env} to your OpenAI API key "
                "(it is read from that environment variable only)"
            )
        self._key = key or _NO_KEY
        self.client = openai.OpenAI(
            base_url=variant.base_url, api_key=self._key, timeout=variant.timeout_s, max_retries=0
        )
        self.last: Delta | None = None  # the final Delta of the latest stream, cancelled ones too
        self._server = (variant.base_url, variant.model)

    @property
    def folds_system(self) -> bool:
        """Whether the system text goes into the first user turn (configured, or learnt
        from this server's refusal)."""
        mode = self.variant.system_prompt
        return mode == "fold" or (mode == "auto" and self._server in _FOLDED)

    def _wire(self, messages: Sequence[Message]) -> list[Message]:
        sent = [{"role": m["role"], "content": m["content"]} for m in messages]
        return fold_system(sent) if self.folds_system else sent

    def render(self, messages: Sequence[Message]) -> str:
        """The server applies its own chat template: what it is sent is the messages
        (the system text folded where this server needs it)."""
        return json.dumps(self._wire(messages), ensure_ascii=False)

    # --- requests -----------------------------------------------------------------------

    def _params(self, messages: Sequence[Message], options: GenerationOptions) -> dict[str, Any]:
        params: dict[str, Any] = {
            "model": self.variant.model,
            "messages": self._wire(messages),
            "stream": True,
            "temperature": options.temperature,
            "top_p": options.top_p,
        }
        # OpenAI's own API has renamed max_tokens; OpenAI-compatible servers know the old
        # name best (llama.cpp, Ollama, older vLLM).
        limit = "max_completion_tokens" if self.variant.base_url is None else "max_tokens"
        params[limit] = options.max_new_tokens
        if options.seed is not None:
            params["seed"] = options.seed
        return params

    def _open(self, messages: Sequence[Message], options: GenerationOptions
              ) -> tuple[Any, list[Message], str | None]:
        """The open response stream, the messages it was sent and, when the server refused
        the system role and the request was folded, a notice saying so."""
        params = self._params(messages, options)
        try:
            return self._create(params), params["messages"], None
        except openai.OpenAIError as exc:
            refusal: BaseException = exc
            if (isinstance(exc, openai.APIConnectionError)
                    and not isinstance(exc, openai.APITimeoutError)):
                # llama.cpp's server drops the connection when the template fails while
                # it streams: a plain request shows why
                refusal = self._error_of(params["messages"], options) or exc
            if not (self._could_fold(params["messages"]) and refuses_system_role(refusal)):
                raise BackendError(self._explain(refusal)) from None
            notice = self._learn(refusal)
        params = self._params(messages, options)
        try:
            return self._create(params), params["messages"], notice
        except openai.OpenAIError as exc:
            raise BackendError(self._explain(exc)) from None

    def _could_fold(self, sent: Sequence[Message]) -> bool:
        """Sent natively with a system message, and allowed to fold if the server says no."""
        return (self.variant.system_prompt == "auto" and not self.folds_system
                and bool(sent) and sent[0]["role"] == "system")

    def _learn(self, refusal: BaseException) -> str:
        """This server refuses the system role: fold from now on; the notice says so."""
        _FOLDED.add(self._server)
        said = " ".join(_server_message(refusal).split())[:80]
        return (f"variant {self.name!r}: {self.where} refuses the system role ({said}); the "
                "system text now goes into the first user turn (system_prompt: fold in the "
                "variant's YAML skips this retry)")

    def _error_of(self, sent: list[Message], options: GenerationOptions
                  ) -> openai.OpenAIError | None:
        """The error a non-streamed request of the same messages gets, if any. llama.cpp's
        server renders the template inside its stream: a template's error (Gemma 2's
        refusal of the system role) comes back as an empty 200 stream, and only a plain
        request shows it."""
        params = {**self._params(sent, options), "stream": False}
        params["max_tokens" if "max_tokens" in params else "max_completion_tokens"] = 1
        params["messages"] = sent
        for attempt in range(2):  # the dropped stream's pooled connection may be dead
            try:
                self.client.chat.completions.create(**params)
            except openai.APIConnectionError as exc:
                if attempt or isinstance(exc, openai.APITimeoutError):
                    return exc
            except openai.OpenAIError as exc:
                return exc
            else:
                return None
        return None

    def _create(self, params: dict[str, Any]) -> Any:
        try:
            return self.client.chat.completions.create(
                **params, stream_options={"include_usage": True}
            )
        except (openai.BadRequestError, openai.UnprocessableEntityError) as exc:
            if "stream_options" not in str(exc) and "include_usage" not in str(exc):
                raise
            return self.client.chat.completions.create(**params)

    def _explain(self, exc: BaseException) -> str:
        v, where, model = self.variant, self.where, self.variant.model
        if isinstance(exc, openai.APITimeoutError):
            text = f"no answer from {where} within {v.timeout_s:g} s"
        elif isinstance(exc, openai.APIConnectionError):
            cause = exc.__cause__ or exc
            text = f"cannot reach {where}: {_detail(cause)}"
        elif isinstance(exc, openai.AuthenticationError):
            text = f"{where} refused the API key from {v.api_key_env} (401)"
        elif isinstance(exc, openai.PermissionDeniedError):
            text = f"{where} denied access to model {model!r} (403)"
        elif isinstance(exc, openai.NotFoundError):
            text = f"model {model!r} not found at {where} (404)"
        elif isinstance(exc, openai.APIStatusError):
            text = f"{where} answered HTTP {exc.status_code}: {_server_message(exc)}"
        else:
            text = f"{where}: {_detail(exc)}"
        text = f"variant {self.name!r}: {text}"
        if self._key != _NO_KEY:
            text = text.replace(self._key, "***")
        return " ".join(text.split())[:400]

    # --- streaming ---------------------------------------------------------------------

    def stream(self, messages: Sequence[Message], options: GenerationOptions) -> Iterator[Delta]:
        started = time.perf_counter()
        response, sent, notice = self._open(messages, options)
        state = _Reading()
        extra: dict[str, Any] = {}
        try:
            broken = yield from self._read_first(response, state)
            if state.first is None and state.finish is None:  # an empty or cut stream: why?
                error = self._error_of(sent, options)
                if error is not None and self._could_fold(sent) and refuses_system_role(error):
                    notice = self._learn(error)
                    response.close()
                    response, sent, _ = self._open(messages, options)
                    yield from self._read(response, state)
                elif error is not None:
                    raise BackendError(self._explain(error))
                elif broken is not None:
                    raise BackendError(self._explain(broken))
            extra["rendered"] = json.dumps(sent, ensure_ascii=False)
            if notice:
                extra["notice"] = notice
        except GeneratorExit:
            self.last = self._final("cancel", None, state, started, extra)
            raise
        except openai.OpenAIError as exc:
            if state.first is None:
                raise BackendError(self._explain(exc)) from None
            self.last = self._final("error", self._explain(exc), state, started, extra)
            yield self.last
            return
        finally:
            response.close()  # on cancel: the server sees the connection go and stops
        finish = state.finish
        if finish in _FINISH:
            self.last = self._final(_FINISH[finish], None, state, started, extra)
        elif finish is None:
            self.last = self._final("error", "the stream ended before the reply finished",
                                    state, started, extra)
        else:  # content_filter and the like: the provider cut the reply short
            self.last = self._final("error", f"the server stopped the reply ({finish})",
                                    state, started, extra)
        yield self.last

    def _read_first(self, response: Any, state: _Reading
                    ) -> Generator[Delta, None, openai.APIConnectionError | None]:
        """`_read`, but a connection the server drops before any text is returned, not
        raised: llama.cpp's server drops (or ends empty) a stream whose template failed."""
        try:
            yield from self._read(response, state)
        except openai.APIConnectionError as exc:
            if state.first is not None:
                raise
            return exc
        return None

    @staticmethod
    def _read(response: Any, state: _Reading) -> Iterator[Delta]:
        for chunk in response:
            if getattr(chunk, "usage", None):
                state.usage = chunk.usage
            for choice in chunk.choices or ():
                piece = choice.delta.content if choice.delta else None
                if piece:
                    state.first = state.first or time.perf_counter()
                    yield Delta(text=piece)
                if choice.finish_reason:
                    state.finish = choice.finish_reason

    def _final(self, reason: str, error: str | None, state: _Reading, started: float,
               extra: dict[str, Any]) -> Delta:
        ended = time.perf_counter()
        usage, first = state.usage, state.first
        completion = getattr(usage, "completion_tokens", None)
        rate = None
        if first and completion and completion > 1 and ended > first:
            rate = (completion - 1) / (ended - first)
        return Delta(
            done=True,
            stop_reason=reason,
            prompt_tokens=getattr(usage, "prompt_tokens", None),
            completion_tokens=completion,
            ttft_s=(first - started) if first else None,
            tokens_per_s=rate,
            error=error,
            extra=dict(extra),
        )

    def close(self) -> None:
        self.client.close()


def _detail(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _server_message(exc: Any) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        message = inner.get("message") if isinstance(inner, dict) else inner
        if message:
            return str(message)
    return _detail(exc)
