"""Persona prompts and chat templates.

One way to turn (persona, retrieved facts, conversation) into model text, shared by the hf
and gguf backends and by training-data preparation, so a model is trained on exactly the
text it is later prompted with.

- Gemma 2 and 3 have no system role (Gemma 2's template raises "System role not
  supported"): the system text is folded into the first user turn as
  `system + "\\n\\n" + user`, the same folding Gemma 3's own template does.
- Chat templates come from model files and configs, i.e. from strangers: they are rendered
  in Jinja's ImmutableSandboxedEnvironment, and a template that reaches for Python
  internals fails with a TemplateError, not a traceback or worse.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

from jinja2 import TemplateError as JinjaTemplateError
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from pipelines.config import KnowledgeFact, Persona

Message = dict[str, Any]


class TemplateError(Exception):
    """A chat template that cannot be rendered. str() is one line."""


# The Gemma chat format (Gemma 2 and Gemma 3 share it). Like Gemma 2's own template it
# refuses a system message: callers fold the system text first (fold_system), so the text
# is the same whichever template a model file carries.
GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{{ raise_exception('System role not supported') }}"
    "{%- endif -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)

NAMED_TEMPLATES = {"gemma": GEMMA_TEMPLATE}


# --- persona prompts --------------------------------------------------------------------


def format_context(facts: Iterable[KnowledgeFact | str]) -> str:
    lines = [f.text if isinstance(f, KnowledgeFact) else str(f) for f in facts]
    return "\n".join(f"- {line}" for line in lines)


def system_prompt(persona: Persona, context: str | None = None) -> str:
    """The persona's system prompt: without retrieval when context is None, else the
    retrieval prompt with `{context}` replaced (str.replace, not format: persona text and
    facts may contain braces)."""
    if context is None:
        return persona.prompts.system
    return persona.prompts.system_rag.replace("{context}", context)


def build_messages(system: str | None, history: Sequence[Message], user: str) -> list[Message]:
    messages: list[Message] = [{"role": "system", "content": system}] if system else []
    messages.extend({"role": m["role"], "content": m["content"]} for m in history)
    messages.append({"role": "user", "content": user})
    return messages


def fold_system(messages: Sequence[Message]) -> list[Message]:
    """Fold a leading system message into the first user turn (`system\\n\\nuser`)."""
    out = [dict(m) for m in messages]
    if not out or out[0]["role"] != "system":
        return out
    system = out.pop(0)["content"]
    if out and out[0]["role"] == "user":
        out[0]["content"] = f"{system}\n\n{out[0]['content']}" if system else out[0]["content"]
    elif system:
        out.insert(0, {"role": "user", "content": system})
    return out


# --- sandboxed chat templates -----------------------------------------------------------


def _raise_exception(message: str) -> None:
    raise JinjaTemplateError(message)


def _environment() -> ImmutableSandboxedEnvironment:
    # The same settings transformers uses for chat templates.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


_ENV = _environment()


def resolve_template(template: str) -> str:
    """A named template ('gemma') or the Jinja text itself."""
    return NAMED_TEMPLATES.get(template, template)


@lru_cache(maxsize=32)
def _compiled(template: str):
    """Templates are compiled once: a chat turn renders the same one again and again."""
    return _ENV.from_string(template)


RENDER_S = 5.0            # a chat template that renders longer than this is stopped
RENDER_CHARS = 4_000_000  # ... or one that writes more than this
RANGE_ITEMS = 1_000_000   # ... or one whose range() calls yield more items in all


class _Budget:
    """What one render may spend: a template is code from a file (a GGUF's metadata, a
    hub folder), and one that never ends would hang the chat, a job or a worker. Checked
    between output chunks and in every range() the template calls; over it, a TemplateError
    (one line)."""

    def __init__(self) -> None:
        self.deadline = time.monotonic() + RENDER_S
        self.items = 0

    def _check(self) -> None:
        if time.monotonic() > self.deadline:
            raise TemplateError(f"chat template stopped: still rendering after {RENDER_S:g} s")

    def range(self, *args: int) -> range:
        values = range(*args)
        self.items += len(values)
        if self.items > RANGE_ITEMS:
            raise TemplateError(f"chat template stopped: its loops ask for over "
                                f"{RANGE_ITEMS:,} items")
        self._check()
        return values

    def join(self, chunks: Any) -> str:
        out: list[str] = []
        size = 0
        for chunk in chunks:
            out.append(chunk)
            size += len(chunk)
            if size > RENDER_CHARS:
                raise TemplateError(f"chat template stopped: over {RENDER_CHARS:,} "
                                    "characters of prompt")
            self._check()
        return "".join(out)


def render_chat(
    template: str,
    messages: Sequence[Message],
    *,
    bos_token: str = "",
    eos_token: str = "",
    add_generation_prompt: bool = True,
) -> str:
    budget = _Budget()
    try:
        chunks = _compiled(resolve_template(template)).generate(
            messages=list(messages),
            bos_token=bos_token,
            eos_token=eos_token,
            add_generation_prompt=add_generation_prompt,
            range=budget.range,
        )
        return budget.join(chunks)
    except TemplateError:
        raise
    except SecurityError as exc:
        raise TemplateError(f"chat template refused: it tried to reach Python internals ({exc})") from None
    except JinjaTemplateError as exc:
        raise TemplateError(f"chat template error: {exc}") from None
    except Exception as exc:  # a template is code from a file: any failure is the template's
        raise TemplateError(f"chat template failed: {type(exc).__name__}: {exc}") from None


@lru_cache(maxsize=32)
def supports_system(template: str) -> bool:
    """Whether a template accepts a system message (Gemma's do not)."""
    sentinel = "KYARA-SYSTEM-PROBE"
    probe = [{"role": "system", "content": sentinel}, {"role": "user", "content": "hello"}]
    try:
        text = render_chat(template, probe)
    except TemplateError:
        return False
    return sentinel in text  # a template that silently drops the system text counts as no


def prepare(template: str, messages: Sequence[Message]) -> list[Message]:
    """The messages a template will actually be given: system folded where unsupported."""
    return list(messages) if supports_system(template) else fold_system(messages)


def render_prompt(
    template: str,
    messages: Sequence[Message],
    *,
    bos_token: str = "",
    eos_token: str = "",
    add_generation_prompt: bool = True,
) -> str:
    """Fold the system text if the template needs it, then render: the one path from a
    conversation to model text."""
    return render_chat(
        template,
        prepare(template, messages),
        bos_token=bos_token,
        eos_token=eos_token,
        add_generation_prompt=add_generation_prompt,
    )
