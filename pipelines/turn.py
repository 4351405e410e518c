"""One turn, the same for chat, compare, `kyara ask` (through ChatSession) and the eval job:
the history the model is sent, the persona's prompt (with the facts retrieval finds for this
turn), and the reply streamed from a backend. The prompt the model was given comes back in
the stream's final Delta (`extra["rendered"]`, what the backend rendered or the server was
really sent): it is not rendered a second time to be logged.

The history rule, one for the model, the judge and the exports: the user turns that got a
reply the user saw (complete, or incomplete: stopped while streaming) with that reply (the
chosen alternative, an edited text), the last `HISTORY_TURNS` of them. A compare question
stands alone.
"""

from __future__ import annotations

import time
from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pipelines.inference.base import BackendError, Delta, GenerationOptions, Message
from pipelines.prompting import TemplateError, build_messages, format_context, system_prompt

HISTORY_TURNS = 8  # user/assistant pairs of history sent with each prompt


def seen(reply: Mapping[str, Any]) -> bool:
    """A stored reply the user saw, so the conversation goes on from it."""
    return reply.get("status") in ("complete", "incomplete") and bool(reply.get("content"))


def history(pairs: Sequence[tuple[str, str]], turns: int | None = HISTORY_TURNS
            ) -> list[dict[str, str]]:
    """The messages sent before the next user turn: the last `turns` (user, reply) pairs
    (all of them when `turns` is None; none when 0)."""
    if turns == 0:
        return []
    out: list[dict[str, str]] = []
    for user, reply in pairs[-turns:] if turns else pairs:
        out.append({"role": "user", "content": user})
        out.append({"role": "assistant", "content": reply})
    return out


@dataclass
class Prompt:
    """What one turn sends: the messages, and the facts retrieved for it (None: retrieval
    off for this turn) and how long that took."""

    messages: list[Message]
    hits: list[Any] | None = None
    retrieval_ms: float | None = None


def retrieve(retriever: Any, text: str) -> tuple[list[Any], float]:
    """The facts for this user turn and the milliseconds the search took."""
    started = time.perf_counter()
    hits = retriever.search(text)
    return hits, (time.perf_counter() - started) * 1000


def build(persona: Any, past: Sequence[Message], user: str, hits: list[Any] | None = None,
          retrieval_ms: float | None = None) -> Prompt:
    """The persona's system prompt (the facts in it when there are hits), the history, the
    user's turn."""
    context = format_context(h.text for h in hits) if hits is not None else None
    return Prompt(build_messages(system_prompt(persona, context), past, user), hits,
                  retrieval_ms)


@dataclass
class Reply:
    """How a streamed reply ended. `error`: one line, the stream failed (the text so far
    kept); `final`: the backend's last Delta when there was one."""

    text: str
    final: Delta | None
    rendered: str | None
    error: str | None = None

    @property
    def stop_reason(self) -> str:
        if self.error is not None:
            return "error"
        return self.final.stop_reason if self.final is not None else "error"

    @property
    def notice(self) -> str | None:
        return self.final.extra.get("notice") if self.final is not None else None


def stream(backend: Any, messages: Sequence[Message], options: GenerationOptions,
           shown: list[str] | None = None) -> Generator[Delta, None, Reply]:
    """Streams the reply's text Deltas; returns how it ended (`yield from`). A BackendError
    or TemplateError, before or after the first token, is the Reply's one-line error, the
    text so far kept; a final Delta with stop reason `error` likewise. Closing the generator
    (a cancel, Ctrl+C) closes the backend's stream, which stops generation within a token;
    `shown` collects the text passed on so far, for whoever keeps a cancelled reply.

    The rendered prompt is the final Delta's; a backend that does not report it is asked to
    render (so is one that failed before its final Delta, for the log)."""
    parts: list[str] = [] if shown is None else shown
    final: Delta | None = None
    error: str | None = None
    source = backend.stream(messages, options)
    try:
        for delta in source:
            if delta.done:
                final = delta
                break
            parts.append(delta.text)
            yield delta
    except (BackendError, TemplateError) as exc:
        error = " ".join(str(exc).split())
    finally:
        source.close()
    if final is not None and final.stop_reason == "error":
        error = " ".join((final.error or "generation failed").split())
    rendered = final.extra.get("rendered") if final is not None else None
    if rendered is None:
        rendered = render(backend, messages)
    return Reply("".join(parts), final, rendered, error)


def render(backend: Any, messages: Sequence[Message]) -> str | None:
    """The prompt text for the log where no final Delta reported it (None: the template
    fails here too; the reply's error says why)."""
    try:
        return backend.render(messages)
    except (BackendError, TemplateError):
        return None
