"""Judge providers behind one small interface: `await provider.complete(prompt)` returns a
Completion (text, logprobs where the provider has them, token count) or raises
ProviderError with an error kind and whether trying again may help.

- OpenAI and any OpenAI-compatible server: the same code, the official `openai`
  AsyncOpenAI client with max_retries=0. The retry loop is the runner's own, so it can
  honour Retry-After, cap it, count attempts, and stop at once on 401/403/404.
- A local llama.cpp judge (llama_cpp.Llama on a GGUF): it writes its reasoning, then a
  score line whose digit is forced by a GBNF grammar; the full distribution over the
  digit tokens at that position gives the weighted score.

The API key is read from the environment variable the judge config names, and only from
there. It never appears in a message: 401 answers are not quoted (OpenAI's echoes part of
the key) and every message is scrubbed of the key before it leaves this module.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import math
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pipelines.config import JudgeConfig
from pipelines.judge.parse import TokenLogprob, digit_of
from pipelines.judge.verdict import (
    BAD_REQUEST,
    CONNECTION,
    EMPTY,
    FORBIDDEN,
    LOCAL,
    MALFORMED,
    NOT_FOUND,
    RATE_LIMITED,
    SERVER,
    TIMEOUT,
    UNAUTHORIZED,
    JudgeError,
)

log = logging.getLogger("kyara.judge")

NO_KEY = "sk-no-key-required"  # local servers ignore the key, but the client wants one
TOP_LOGPROBS = 20               # OpenAI's maximum


@dataclass
class Completion:
    text: str
    logprobs: list[TokenLogprob] | None = None
    tokens: int = 0
    finish_reason: str | None = None


class ProviderError(Exception):
    """One failed request. str() is one line for the user, without the key."""

    def __init__(self, kind: str, message: str, *, retryable: bool,
                 retry_after: float | None = None, fatal: bool = False) -> None:
        self.kind = kind
        self.retryable = retryable
        self.retry_after = retry_after
        self.fatal = fatal  # every later request would fail the same way: stop asking
        super().__init__(" ".join(message.split())[:300])


class Provider(Protocol):
    model: str
    label: str                   # how the console names it: model @ where
    local: bool                  # a local judge is uncalibrated until calibrated

    async def complete(self, prompt: str) -> Completion: ...

    async def aclose(self) -> None:
        """Release what belongs to the running event loop (connections); the provider
        stays usable, from this loop or another."""


def make_provider(config: JudgeConfig, *, home: Path | None = None,
                  env: Mapping[str, str] | None = None, isolated: bool = False) -> Provider:
    """isolated=True runs a local model in its own worker process (the console does: a
    crash there is a failed verdict, not a dead console); HTTP providers stay in process."""
    if config.provider == "llama_cpp":
        if isolated:
            return WorkerProvider(config, home=home)
        return LlamaCppProvider(config, home=home)
    return OpenAIProvider(config, env=env)


# --- OpenAI and OpenAI-compatible ------------------------------------------------------


class OpenAIProvider:
    local = False

    def __init__(self, config: JudgeConfig, *, env: Mapping[str, str] | None = None) -> None:
        import httpx2  # the openai client's own HTTP library (its documented raw-request type)
        import openai  # here, not in complete(): a 0.5 s import must not stall a live loop

        self._openai = openai
        self._raw_response = httpx2.Response
        env = os.environ if env is None else env
        self.config = config
        self.model = config.model
        if config.provider == "openai_compatible" and not config.base_url:
            raise JudgeError(f"judge {config.name}: provider openai_compatible needs base_url "
                             "(e.g. http://127.0.0.1:8000/v1)")
        self.where = config.base_url or "the OpenAI API"
        self.label = f"{config.model} @ {self.where}"
        key = env.get(config.api_key_env) if config.api_key_env else None
        if not key and not config.base_url:
            raise JudgeError(f"judge {config.name}: set {config.api_key_env or 'OPENAI_API_KEY'} "
                             "to your OpenAI API key (it is read from that environment "
                             "variable only)")
        self._key = key or NO_KEY
        self._logprobs = config.logprobs
        self._client: Any = None
        self._client_loop: asyncio.AbstractEventLoop | None = None

    def _scrub(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key != NO_KEY else text

    def _client_for_this_loop(self) -> Any:
        """An AsyncOpenAI client per event loop: its connection pool belongs to the loop
        that opened it (the sync wrapper runs a fresh loop per call)."""
        loop = asyncio.get_running_loop()
        if self._client is None or self._client_loop is not loop:
            self._client = self._openai.AsyncOpenAI(
                base_url=self.config.base_url, api_key=self._key,
                timeout=self.config.timeout_s, max_retries=0,
            )
            self._client_loop = loop
        return self._client

    def batch_client(self) -> Any:
        """A synchronous client on the same server and key, for the Batch API's files and
        batches (pipelines.judge.batch_api); no retries of its own either."""
        return self._openai.OpenAI(base_url=self.config.base_url, api_key=self._key,
                                   timeout=self.config.timeout_s, max_retries=0)

    def request_body(self, prompt: str) -> dict[str, Any]:
        """The chat-completions body `complete` sends (the Batch API sends the same)."""
        return self._params(prompt)

    def _params(self, prompt: str) -> dict[str, Any]:
        params: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": self.config.temperature,
            "seed": self.config.seed,
        }
        # OpenAI's own API renamed max_tokens; compatible servers know the old name best.
        params["max_completion_tokens" if self.config.base_url is None else "max_tokens"] = self.config.max_tokens
        if self._logprobs:
            params.update(logprobs=True, top_logprobs=TOP_LOGPROBS)
        return params

    async def complete(self, prompt: str) -> Completion:
        openai = self._openai
        client = self._client_for_this_loop()
        try:
            # The client's documented raw request (`cast_to=httpx2.Response`): the body is
            # parsed here with json.loads, not transformed and validated into pydantic
            # models (half the client's CPU per request, which bounds throughput at
            # concurrency 8), and a body that is not a chat completion is a clear
            # `malformed`, whatever the library would make of it. The client's timeout is
            # per read; wait_for bounds the whole answer, so a server that trickles bytes
            # cannot hold a slot for ever.
            raw = await asyncio.wait_for(
                client.post("/chat/completions", body=self._params(prompt),
                            cast_to=self._raw_response),
                timeout=self.config.timeout_s,
            )
        except (asyncio.TimeoutError, openai.APITimeoutError):
            raise ProviderError(TIMEOUT, f"judge {self.config.name}: no answer from "
                                f"{self.where} within {self.config.timeout_s:g} s",
                                retryable=True) from None
        except openai.APIStatusError as exc:
            if (self._logprobs and exc.status_code in (400, 422)
                    and "logprob" in str(exc).lower()):
                # Some compatible servers (older Ollama) refuse logprobs: ask without.
                log.info("judge %s: the server refused logprobs; asking without",
                         self.config.name)
                self._logprobs = False
                return await self.complete(prompt)
            raise self._status_error(exc) from None
        except openai.APIConnectionError as exc:
            cause = exc.__cause__ or exc
            detail = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
            raise ProviderError(CONNECTION, self._scrub(f"judge {self.config.name}: cannot reach "
                                f"{self.where}: {detail}"), retryable=True) from None
        except openai.OpenAIError as exc:
            raise ProviderError(SERVER, self._scrub(f"judge {self.config.name}: {exc}"),
                                retryable=True) from None
        return self._completion(raw.content)

    def _malformed(self, what: str) -> ProviderError:
        return ProviderError(MALFORMED, f"judge {self.config.name}: {self.where} sent a "
                             f"malformed answer ({what})", retryable=True)

    def _completion(self, body: bytes) -> Completion:
        try:
            data = json.loads(body)
        except ValueError:
            raise self._malformed("not JSON") from None
        return self.completion_of(data)

    def completion_of(self, data: Any) -> Completion:
        """A chat completion's parsed body as a Completion, or ProviderError (malformed,
        empty): the live answer and a Batch API output row are read alike."""
        choices = data.get("choices") if isinstance(data, dict) else None
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise self._malformed("no completion in it")
        choice = choices[0]
        message = choice.get("message")
        text = message.get("content") if isinstance(message, dict) else None
        if not isinstance(text, str) or not text.strip():
            # No judgment to keep: a failure (asked again next run), not an invalid verdict.
            raise ProviderError(EMPTY, f"judge {self.config.name}: {self.where} answered with "
                                f"empty text (finish reason {choice.get('finish_reason')})",
                                retryable=True)
        usage = data.get("usage")
        tokens = usage.get("total_tokens") if isinstance(usage, dict) else None
        return Completion(
            text=text,
            logprobs=_token_logprobs(choice.get("logprobs")),
            tokens=tokens if isinstance(tokens, int) else 0,
            finish_reason=choice.get("finish_reason"),
        )

    def _status_error(self, exc: Any) -> ProviderError:
        status = exc.status_code
        name, env = self.config.name, self.config.api_key_env or "the key variable"
        if status == 401:
            return ProviderError(UNAUTHORIZED, f"judge {name}: 401 unauthorized — check {env}",
                                 retryable=False, fatal=True)
        if status == 403:
            return ProviderError(FORBIDDEN, f"judge {name}: 403 forbidden — the key from {env} "
                                 f"may not use model {self.model!r}", retryable=False,
                                 fatal=True)
        if status == 404:
            return ProviderError(NOT_FOUND, f"judge {name}: 404 — no model {self.model!r} or no "
                                 f"chat endpoint at {self.where}", retryable=False, fatal=True)
        detail = self._scrub(_server_message(exc))
        if status == 429:
            return ProviderError(RATE_LIMITED, f"judge {name}: 429 rate limited by {self.where}",
                                 retryable=True, retry_after=retry_after(exc.response.headers))
        if status >= 500 or status in (408, 409):
            return ProviderError(SERVER, f"judge {name}: {self.where} answered HTTP {status}"
                                 + (f": {detail}" if detail else ""), retryable=True,
                                 retry_after=retry_after(exc.response.headers))
        return ProviderError(BAD_REQUEST, f"judge {name}: {self.where} refused the request "
                             f"(HTTP {status})" + (f": {detail}" if detail else ""),
                             retryable=False)

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None and self._client_loop is asyncio.get_running_loop():
            await client.close()


def _server_message(exc: Any) -> str:
    """The server's own error message when it sent JSON; nothing from an HTML page."""
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        message = inner.get("message") if isinstance(inner, dict) else inner
        if isinstance(message, str):
            return message.strip().splitlines()[0][:160] if message.strip() else ""
    return ""


def retry_after(headers: Any) -> float | None:
    """Seconds to wait from `retry-after-ms` or `Retry-After` (seconds or an HTTP date)."""
    if headers is None:
        return None
    value = headers.get("retry-after-ms")
    try:
        if value is not None:
            return max(0.0, float(value) / 1000)
    except ValueError:
        pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        seconds = float(value)
        return max(0.0, seconds) if math.isfinite(seconds) else None
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        return max(0.0, when.timestamp() - time.time())


def _token_logprobs(logprobs: Any) -> list[TokenLogprob] | None:
    """OpenAI's choice.logprobs.content; None when absent or not in that shape (logprobs
    are a bonus: a server that sends odd ones still gives a discrete score).

    Only digit tokens keep their top alternatives: the weighted score reads them at the
    score position alone, and a long answer has hundreds of tokens times 20 alternatives.
    """
    content = logprobs.get("content") if isinstance(logprobs, dict) else None
    if not isinstance(content, list) or not content:
        return None
    out = []
    try:
        for item in content:
            raw = item.get("bytes")
            token = item["token"]
            top: tuple[tuple[str, float], ...] = ()
            if digit_of(token) is not None:
                top = tuple((t["token"], float(t["logprob"])) for t in item.get("top_logprobs") or ())
            out.append(TokenLogprob(token, float(item["logprob"]), top,
                                    bytes(raw) if raw is not None else None))
    except (AttributeError, KeyError, TypeError, ValueError):
        return None
    return out


# --- local llama.cpp -------------------------------------------------------------------

SCORE_PREFIX = "\nスコア: "
SCORE_GRAMMAR = 'root ::= [1-7]'
REASONING_TOKENS = 256
LOCAL_CTX = 8192


class _LocalJudge:
    """What both local judges (in process, in a worker) say about themselves."""

    local = True

    def __init__(self, config: JudgeConfig, home: Path | None) -> None:
        self.config = config
        self.model = config.model
        self.home = Path(home) if home is not None else None
        self.label = f"{config.model} (llama.cpp, local)"


class LlamaCppProvider(_LocalJudge):
    """A GGUF judge in this process. `model` is a .gguf path (relative to the kyara home
    unless absolute) or `embedded:<name>` for a GGUF carried by a Python package.

    Generation is synchronous and not thread-safe: calls run one at a time in a worker
    thread, so an async caller's event loop keeps running meanwhile.
    """

    def __init__(self, config: JudgeConfig, *, home: Path | None = None) -> None:
        _LocalJudge.__init__(self, config, home)
        self._llm: Any = None
        self._lock = threading.Lock()

    def model_path(self) -> Path:
        if self.model.startswith("embedded:"):
            from pipelines.inference.embedded import ensure_embedded

            if self.home is None:
                raise JudgeError(f"judge {self.config.name}: an embedded model needs the kyara home")
            try:
                return ensure_embedded(self.model.removeprefix("embedded:"), self.home)
            except Exception as exc:  # BackendError: missing package, bad name
                raise JudgeError(f"judge {self.config.name}: {exc}") from None
        path = Path(os.path.expandvars(self.model)).expanduser()
        if not path.is_absolute() and self.home is not None:
            path = self.home / path
        return path

    def _load(self) -> Any:
        if self._llm is not None:
            return self._llm
        import llama_cpp

        from pipelines.inference.llama_logs import route_llama_logs

        route_llama_logs(llama_cpp)
        path = self.model_path()
        if not path.is_file():
            raise JudgeError(f"judge {self.config.name}: model file not found: {path}")
        try:
            llm = llama_cpp.Llama(model_path=str(path), n_ctx=LOCAL_CTX, verbose=False,
                                  seed=self.config.seed)
        except (ValueError, RuntimeError, OSError) as exc:
            raise JudgeError(f"judge {self.config.name}: cannot load {path}: "
                             f"{' '.join(str(exc).split())}") from None
        self._digit_ids: dict[int, int] = {}
        for digit in range(1, 8):
            ids = llm.tokenize(str(digit).encode(), add_bos=False, special=False)
            if len(ids) == 1:
                self._digit_ids[ids[0]] = digit
        self._grammar = llama_cpp.LlamaGrammar.from_string(SCORE_GRAMMAR, verbose=False)
        bos = llm.token_bos()
        self._bos = llm.detokenize([bos], special=True).decode("utf-8", "replace") if bos >= 0 else ""
        self._llm = llm
        return llm

    async def complete(self, prompt: str) -> Completion:
        return await asyncio.to_thread(self._complete_locked, prompt)

    def _complete_locked(self, prompt: str) -> Completion:
        with self._lock:
            try:
                return self._complete(prompt)
            except ProviderError:
                raise
            except JudgeError as exc:  # no model file, a GGUF llama.cpp cannot read
                raise ProviderError(LOCAL, str(exc), retryable=False, fatal=True) from None
            except Exception as exc:  # llama.cpp raises ValueError/RuntimeError for many things
                raise ProviderError(LOCAL, f"judge {self.config.name}: llama.cpp failed: "
                                    f"{' '.join(str(exc).split()) or type(exc).__name__}",
                                    retryable=False) from None

    def _complete(self, prompt: str) -> Completion:
        import llama_cpp
        import numpy as np

        from pipelines.prompting import GEMMA_TEMPLATE, render_prompt

        llm = self._load()
        text = render_prompt(GEMMA_TEMPLATE, [{"role": "user", "content": prompt}],
                             bos_token=self._bos)
        ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        if len(ids) + REASONING_TOKENS + 16 > LOCAL_CTX:
            raise ProviderError(LOCAL, f"judge {self.config.name}: the prompt ({len(ids)} "
                                f"tokens) does not fit the local context of {LOCAL_CTX}",
                                retryable=False)
        # 1. The reasoning, free text, stopped before the model writes a score itself.
        first = llm.create_completion(
            ids, max_tokens=REASONING_TOKENS, temperature=self.config.temperature,
            seed=self.config.seed, stop=["<end_of_turn>", "スコア:", "スコア：", "Score:"],
        )
        reasoning = first["choices"][0]["text"].rstrip()
        # 2. The score line: the prefix is ours, the digit is the model's, and the grammar
        #    allows only 1-7. The logits at that position, before the grammar masks them,
        #    give the probability of each digit (G-Eval over the whole vocabulary).
        head = reasoning + SCORE_PREFIX
        ids2 = llm.tokenize((text + head).encode("utf-8"), add_bos=False, special=True)
        seen: list[Any] = []

        def capture(_input_ids: Any, logits: Any) -> Any:
            if not seen:
                seen.append(np.array(logits, dtype=np.float64, copy=True))
            return logits

        second = llm.create_completion(
            ids2, max_tokens=1, temperature=0.0, grammar=self._grammar,
            logits_processor=llama_cpp.LogitsProcessorList([capture]),
        )
        digit = second["choices"][0]["text"]
        tokens = int(first["usage"]["total_tokens"]) + int(second["usage"]["completion_tokens"])
        logprobs = None
        if seen and digit:
            top = self._digit_logprobs(seen[0])
            chosen = dict(top).get(digit, float("-inf"))
            logprobs = [TokenLogprob(head, 0.0), TokenLogprob(digit, chosen, top)]
        return Completion(text=head + digit, logprobs=logprobs, tokens=tokens,
                          finish_reason="stop")

    def _digit_logprobs(self, logits: Any) -> tuple[tuple[str, float], ...]:
        import numpy as np

        if logits.shape[0] <= max(self._digit_ids, default=0):
            return ()
        peak = float(np.max(logits))
        log_total = peak + math.log(float(np.sum(np.exp(logits - peak))))
        return tuple((str(d), float(logits[i]) - log_total) for i, d in self._digit_ids.items())

    async def aclose(self) -> None:
        """Nothing belongs to a loop here: the model stays loaded for the next call."""

    def unload(self) -> None:
        with self._lock:
            llm, self._llm = self._llm, None
            if llm is not None:
                llm.close()

    def close(self) -> None:
        self.unload()

    def complete_json(self, prompt: str) -> dict[str, Any]:
        """`complete` for a worker process: synchronous, the Completion as JSON."""
        return completion_to_json(self._complete_locked(prompt))


def load_local_judge(judge: dict[str, Any], home: str | None) -> tuple[LlamaCppProvider, dict]:
    """The child's model for a WorkerProvider (pipelines.inference.worker): the local judge,
    loaded now so that a model that cannot load is the worker's load error."""
    from pipelines.inference.base import BackendError

    provider = LlamaCppProvider(JudgeConfig.model_validate(judge),
                                home=Path(home) if home else None)
    try:
        provider._load()
    except JudgeError as exc:  # no model file, a GGUF llama.cpp cannot read
        raise BackendError(str(exc)) from None
    return provider, {}


class WorkerProvider(_LocalJudge):
    """The local llama.cpp judge (LlamaCppProvider) in a worker process, for the console:
    the same `complete` contract; a crash there is a failed verdict (retryable: the next
    call starts a fresh worker), never a dead console."""

    def __init__(self, config: JudgeConfig, *, home: Path | None = None) -> None:
        _LocalJudge.__init__(self, config, home)
        self._load = {"target": "pipelines.judge.providers:load_local_judge",
                      "args": {"judge": config.model_dump(mode="json"),
                               "home": str(self.home) if self.home is not None else None}}
        self._process: Any = None
        self._start_lock = threading.Lock()

    def _ready(self) -> Any:
        from pipelines.inference.worker import ModelProcess, worker_log

        with self._start_lock:
            if self._process is None or not self._process.alive:
                process = ModelProcess(self._load, f"judge {self.config.name}",
                                       worker_log(self.home, f"judge-{self.config.name}"))
                process.start()
                self._process = process
            return self._process

    def _complete(self, prompt: str) -> Completion:
        from pipelines.inference.base import BackendError
        from pipelines.inference.worker import RemoteError, WorkerDied

        try:
            result = self._ready().request("call", "judging a reply", method="complete_json",
                                           args={"prompt": prompt})
        except WorkerDied as exc:
            raise ProviderError(LOCAL, str(exc), retryable=True) from None
        except RemoteError as exc:
            if exc.kind == "ProviderError":
                f = exc.fields
                raise ProviderError(f.get("kind", LOCAL), str(exc),
                                    retryable=bool(f.get("retryable")),
                                    retry_after=f.get("retry_after"),
                                    fatal=bool(f.get("fatal"))) from None
            raise ProviderError(LOCAL, str(exc), retryable=False) from None
        except BackendError as exc:  # the model could not be loaded: every call would fail
            raise ProviderError(LOCAL, str(exc), retryable=False, fatal=True) from None
        return completion_from_json(result)

    async def complete(self, prompt: str) -> Completion:
        return await asyncio.to_thread(self._complete, prompt)

    async def aclose(self) -> None:
        """Nothing belongs to a loop here: the model stays loaded for the next call."""

    def unload(self) -> None:
        if self._process is not None:
            self._process.close()
            self._process = None


def completion_to_json(completion: Completion) -> dict[str, Any]:
    logprobs = None
    if completion.logprobs is not None:
        logprobs = [{"token": t.token, "logprob": t.logprob, "top": [list(x) for x in t.top],
                     "bytes": list(t.bytes) if t.bytes is not None else None}
                    for t in completion.logprobs]
    return {"text": completion.text, "logprobs": logprobs, "tokens": completion.tokens,
            "finish_reason": completion.finish_reason}


def completion_from_json(data: dict[str, Any]) -> Completion:
    logprobs = None
    if data.get("logprobs") is not None:
        logprobs = [TokenLogprob(t["token"], float(t["logprob"]),
                                 tuple((a, float(b)) for a, b in t["top"]),
                                 bytes(t["bytes"]) if t["bytes"] is not None else None)
                    for t in data["logprobs"]]
    return Completion(text=data["text"], logprobs=logprobs, tokens=int(data["tokens"]),
                      finish_reason=data.get("finish_reason"))
