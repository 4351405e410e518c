"""The ChatBackend contract (DESIGN.md).

`stream(messages, options)` is synchronous on purpose: llama.cpp and transformers stream
synchronously, and the console drives a backend from a thread worker. Every Delta but the
last carries text; the last has `done=True` and the stop reason, token counts, time to
first token and tokens/s. Cancel = the consumer stops iterating (closes the generator);
generation then stops within one token.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from pipelines.config import Generation

StopReason = Literal["eos", "length", "cancel", "error"]
Message = dict[str, Any]


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity: a container's or taskset's
    limit), which is what a decode loop should use; os.cpu_count() counts the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class BackendError(Exception):
    """A model that cannot be loaded or run. str() is one line the user can act on."""


@dataclass
class GenerationOptions:
    max_new_tokens: int = 96
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 64
    repeat_penalty: float = 1.0
    seed: int | None = None

    @classmethod
    def from_config(cls, gen: Generation, **overrides: Any) -> GenerationOptions:
        values = gen.model_dump()
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Delta:
    text: str = ""
    done: bool = False
    stop_reason: StopReason | None = None
    stop_token: str | None = None  # which end-of-generation token stopped it, if one did
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    ttft_s: float | None = None
    tokens_per_s: float | None = None
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def final_delta(reason: str, stop_token: str | None, error: str | None, prompt_tokens: int,
                tokens: Sequence[int], started: float, first: float | None,
                ended: float, rendered: str | None = None) -> Delta:
    """The last Delta of a stream, the same for every local backend. Decode speed is the
    tokens after the first over the time after the first: the first token's time is prompt
    processing, reported as time to first token. `rendered`: the prompt text the model
    was given (extra["rendered"], logged with the reply: no second render to log it)."""
    rate = ((len(tokens) - 1) / (ended - first)
            if first and len(tokens) > 1 and ended > first else None)
    return Delta(done=True, stop_reason=reason, stop_token=stop_token,
                 prompt_tokens=prompt_tokens, completion_tokens=len(tokens),
                 ttft_s=(first - started) if first else None, tokens_per_s=rate, error=error,
                 extra={"token_ids": list(tokens),
                        **({"rendered": rendered} if rendered is not None else {})})


@runtime_checkable
class ChatBackend(Protocol):
    name: str
    # Capabilities are class attributes, read with a False default (a minimal backend
    # declares none; not protocol members, so isinstance needs none): `batched = True`: it
    # has generate_batch(conversations, options, batch_size) -> final Deltas, several
    # prompts per forward pass (the eval job's single-turn replies).

    def render(self, messages: Sequence[Message]) -> str:
        """The exact prompt text the model will see (logged with every reply)."""

    def stream(self, messages: Sequence[Message], options: GenerationOptions) -> Iterator[Delta]:
        ...

    def close(self) -> None:
        ...
