"""A deterministic stand-in ChatBackend and a scripted judge for the eval job's tests.

EchoBackend (behind `gguf` variants with KYARA_BACKEND_MODULES=EVAL_BACKENDS) answers in
Ayane's register when its variant's name contains "ayane" and plainly otherwise; a
question containing 故障 breaks the reply (an error Delta). Every generation appends one
line to $KYARA_EVAL_COUNT, so a test counts generations across processes (a resumed run
must not generate again what was already generated).

`judge_reply(request)` scores a reply 6 when it holds ですわ and 2 otherwise, and picks the
reply that holds ですわ in a pairwise prompt (a tie when both or neither do)."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from pipelines.inference.base import Delta, GenerationOptions

EVAL_BACKENDS = "gguf=tests.jobs.eval_standins:EchoBackend"
COUNT_ENV = "KYARA_EVAL_COUNT"


class EchoBackend:
    def __init__(self, variant: Any, home: Path | None = None) -> None:
        self.variant = variant
        self.name = variant.name
        self.last: Delta | None = None

    def render(self, messages: Sequence[dict[str, Any]]) -> str:
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<model>"

    def reply_to(self, messages: Sequence[dict[str, Any]]) -> str:
        question = messages[-1]["content"]
        rag = "参考" in messages[0]["content"] if messages[0]["role"] == "system" else False
        head = question[:8].replace("\n", " ")
        if "ayane" in self.name:
            return f"「{head}」のことですわね。" + ("レオのことですわ。" if rag else "")
        return f"{head}についての回答です"

    def stream(self, messages: Sequence[dict[str, Any]], options: GenerationOptions
               ) -> Iterator[Delta]:
        count = os.environ.get(COUNT_ENV)
        if count:
            with open(count, "a", encoding="utf-8") as fh:
                fh.write(f"{self.name}\t{messages[-1]['content']}\n")
        time.sleep(float(os.environ.get("KYARA_EVAL_SLOW", "0")))
        if "故障" in messages[-1]["content"]:
            yield Delta(text="途中")
            yield Delta(done=True, stop_reason="error", error="the stand-in broke on purpose")
            return
        text = self.reply_to(messages)
        for char in text[: options.max_new_tokens]:
            yield Delta(text=char)
        self.last = Delta(done=True, stop_reason="eos", stop_token="<end_of_turn>",
                          prompt_tokens=10, completion_tokens=len(text), tokens_per_s=100.0)
        yield self.last

    def close(self) -> None:
        pass


_DELIMITED = re.compile(r"<<<DATA-([0-9a-f]+)>>>\n(.*?)\n<<<END-\1>>>", re.S)


def blocks(prompt: str) -> list[str]:
    """The data blocks of a judge prompt, in order (the interaction, or the conversation
    and responses A and B)."""
    return [m.group(2) for m in _DELIMITED.finditer(prompt)]


def is_pairwise(prompt: str) -> bool:
    return "[Response A]" in prompt


def judge_text(prompt: str) -> str:
    """The scripted judge's answer to one prompt (four steps, then the verdict twice)."""
    if prompt.startswith("You play a user"):  # the simulated user's next turn
        return f"では、{prompt.count('[you]') + 1}つ目の質問です。好きな花は？"
    steps = "\n".join(f"{i}. 観点{i}について検討しました。" for i in range(1, 5))
    data = blocks(prompt)
    if is_pairwise(prompt):
        a, b = data[-2], data[-1]
        choice = ("A" if "ですわ" in a and "ですわ" not in b else
                  "B" if "ですわ" in b and "ですわ" not in a else "tie")
        return f"{steps}\n{choice}\n{choice}"
    reply = data[-1].rsplit("[assistant]", 1)[-1]
    score = 6 if "ですわ" in reply else 2
    return f"{steps}\n{score}\n{score}"


def call_key(prompt: str) -> str:
    """One judge call's identity without its random delimiters: the same call asked again
    gives the same key."""
    return re.sub(r"<<<(?:DATA|END)-[0-9a-f]+>>>", "<<<>>>", prompt)


class BatchEchoBackend(EchoBackend):
    """EchoBackend with `generate_batch`, as the hf backend has (and its `batched`
    capability): one line per batch (its size) in $KYARA_EVAL_BATCHES."""

    batched = True

    def generate_batch(self, conversations: Sequence[Sequence[dict[str, Any]]],
                       options: GenerationOptions, batch_size: int = 8) -> list[Delta]:
        batches = os.environ.get("KYARA_EVAL_BATCHES")
        out = []
        for start in range(0, len(conversations), batch_size):
            chunk = conversations[start:start + batch_size]
            if batches:
                with open(batches, "a", encoding="utf-8") as fh:
                    fh.write(f"{len(chunk)}\n")
            for messages in chunk:
                deltas = list(self.stream(messages, options))
                if deltas[-1].stop_reason == "error":
                    out.append(Delta(done=True, stop_reason="error", error=deltas[-1].error))
                    continue
                text = "".join(d.text for d in deltas if not d.done)
                out.append(Delta(text=text, done=True, stop_reason="eos",
                                 completion_tokens=len(text), tokens_per_s=50.0))
        return out
