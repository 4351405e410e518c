"""Any OpenAI-compatible chat endpoint (OpenAI, vLLM, llama.cpp server, Ollama) as a chat
model, through the official `openai` client.

- The key is read from the variant's `api_key_env` only; a local server without one gets
  a placeholder. No retries: a chat reply that silently waits through back-offs feels
  hung, and the user can press send again.
- Token counts come from the server's usage chunk (`stream_options.include_usage`); a
  server that rejects that option is asked again without it, and counts stay unknown.
- Cancel closes the HTTP stream, so the server stops generating too.
- Errors never carry the API key: a 401 says which variable the key came from, nothing
  of the server's text (OpenAI's 401 echoes part of the key), and every message is
  scrubbed of the key before it leaves.

Errors before the first text raise BackendError; an error after text has streamed ends
the stream with an `error` Delta so the partial reply is kept.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Sequence
from typing import Any

import openai

from pipelines.config import OpenAIVariant
from pipelines.inference.base import BackendError, Delta, GenerationOptions, Message

_NO_KEY = "sk-no-key-required"  # local servers ignore the key, but the client wants one
_FINISH = {"stop": "eos", "length": "length", "tool_calls": "eos", "function_call": "eos"}


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

    def render(self, messages: Sequence[Message]) -> str:
        """The server applies its own chat template: what it is sent is the messages."""
        return json.dumps(list(messages), ensure_ascii=False)

    # --- requests -----------------------------------------------------------------------

    def _params(self, messages: Sequence[Message], options: GenerationOptions) -> dict[str, Any]:
        params: dict[str, Any] = {
            "model": self.variant.model,
            "messages": [{"role": m["role"], "content": m["content"]} for m in messages],
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

    def _open(self, params: dict[str, Any]) -> Any:
        try:
            try:
                return self.client.chat.completions.create(
                    **params, stream_options={"include_usage": True}
                )
            except (openai.BadRequestError, openai.UnprocessableEntityError) as exc:
                if "stream_options" not in str(exc) and "include_usage" not in str(exc):
                    raise
                return self.client.chat.completions.create(**params)
        except openai.OpenAIError as exc:
            raise BackendError(self._explain(exc)) from None

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
        response = self._open(self._params(messages, options))
        finish: str | None = None
        usage: Any = None
        first: float | None = None
        try:
            for chunk in response:
                if getattr(chunk, "usage", None):
                    usage = chunk.usage
                for choice in chunk.choices or ():
                    piece = choice.delta.content if choice.delta else None
                    if piece:
                        first = first or time.perf_counter()
                        yield Delta(text=piece)
                    if choice.finish_reason:
                        finish = choice.finish_reason
        except GeneratorExit:
            self.last = self._final("cancel", None, usage, started, first)
            raise
        except openai.OpenAIError as exc:
            if first is None:
                raise BackendError(self._explain(exc)) from None
            self.last = self._final("error", self._explain(exc), usage, started, first)
            yield self.last
            return
        finally:
            response.close()  # on cancel: the server sees the connection go and stops
        if finish in _FINISH:
            self.last = self._final(_FINISH[finish], None, usage, started, first)
        elif finish is None:
            self.last = self._final(
                "error", "the stream ended before the reply finished", usage, started, first
            )
        else:  # content_filter and the like: the provider cut the reply short
            self.last = self._final(
                "error", f"the server stopped the reply ({finish})", usage, started, first
            )
        yield self.last

    def _final(
        self, reason: str, error: str | None, usage: Any, started: float, first: float | None
    ) -> Delta:
        ended = time.perf_counter()
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
