"""The mini-evaluation after training: the persona's eval questions answered greedily by
the base variant and by the trained one, measured with the deterministic style checks
(and the judge when one is configured and answers), as a before/after table.

Both variants run on one loaded copy: the trained adapter is loaded from the folder the
job wrote (so what is measured is what was saved), and the base answers with the adapter
disabled. Prompts are rendered and tokenised as the hf backend does; generation is
batched (left padding) because one question at a time would take minutes on a CPU.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from pipelines.config import SpeechRules
from pipelines.style import check_reply, style_score

# The お嬢様 sentence endings the quick-start is measured on (issue 6).
OJOUSAMA = re.compile(r"ですわ|ますわ|ですの|わ。")


@dataclass
class Reply:
    question: str
    text: str
    stop: str           # eos | length
    tokens: int


@dataclass
class Figures:
    variant: str
    n: int
    ends_maru: float
    ojousama: float
    median_chars: float
    stop_eos: float
    newlines: float
    style: float
    judge: float | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def figures(variant: str, replies: Sequence[Reply], rules: SpeechRules) -> Figures:
    n = len(replies) or 1
    texts = [r.text.strip() for r in replies]
    return Figures(
        variant=variant,
        n=len(replies),
        ends_maru=sum(t.endswith("。") for t in texts) / n,
        ojousama=sum(bool(OJOUSAMA.search(t)) for t in texts) / n,
        median_chars=float(statistics.median(len(t) for t in texts)) if texts else 0.0,
        stop_eos=sum(r.stop == "eos" for r in replies) / n,
        newlines=sum("\n" in t for t in texts) / n,
        style=statistics.fmean(style_score(check_reply(r.text, rules, r.stop)) for r in replies)
        if replies else 0.0,
    )


def table(before: Figures, after: Figures) -> str:
    rows = [
        ("replies ending with 。", f"{before.ends_maru:.0%}", f"{after.ends_maru:.0%}", "≥ 80%"),
        ("お嬢様 endings", f"{before.ojousama:.0%}", f"{after.ojousama:.0%}", "≥ 60%"),
        ("median length (chars)", f"{before.median_chars:g}", f"{after.median_chars:g}", "≤ 45"),
        ("stopped on the terminator", f"{before.stop_eos:.0%}", f"{after.stop_eos:.0%}", "≥ 95%"),
        ("with line breaks", f"{before.newlines:.0%}", f"{after.newlines:.0%}", ""),
        ("style checks passed", f"{before.style:.0%}", f"{after.style:.0%}", ""),
    ]
    if before.judge is not None or after.judge is not None:
        rows.append(("judge (personality, 1-7)", _num(before.judge), _num(after.judge), ""))
    width = max(len(before.variant), len(after.variant), 8) + 2
    lines = [f"{'':28}{before.variant:>{width}}{after.variant:>{width}}  target"]
    lines += [f"{name:28}{b:>{width}}{a:>{width}}  {t}" for name, b, a, t in rows]
    for note in before.notes + after.notes:
        lines.append(f"note: {note}")
    return "\n".join(lines)


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def generate(model: Any, tokenizer: Any, prompts: Sequence[list[int]], questions: Sequence[str],
             end_ids: Sequence[int], max_new_tokens: int, batch_size: int = 16) -> list[Reply]:
    """Greedy replies to already-tokenised prompts, in batches with left padding."""
    import torch

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_ids[0]
    device = next(model.parameters()).device
    out: list[Reply] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, prompt in enumerate(chunk):
            ids[row, width - len(prompt):] = torch.tensor(prompt)
            mask[row, width - len(prompt):] = 1
        with torch.no_grad():
            result = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                    max_new_tokens=max_new_tokens, do_sample=False,
                                    temperature=None, top_p=None, top_k=None,
                                    eos_token_id=list(end_ids), pad_token_id=pad)
        for row in range(len(chunk)):
            new = result[row, width:].tolist()
            stop = "length"
            for pos, tid in enumerate(new):
                if tid in end_ids:
                    new, stop = new[:pos], "eos"
                    break
            text = tokenizer.decode(new, skip_special_tokens=True)
            out.append(Reply(questions[start + row], text, stop, len(new)))
    return out


def replies_from_backend(backend: Any, system: str | None, questions: Sequence[str],
                         max_new_tokens: int) -> list[Reply]:
    """Greedy replies through a ChatBackend (any variant: a GGUF with its LoRA adapter, a
    server), one question at a time, with the chat engine's prompt (system folded as in
    chat). The same measure as generate(), for variants that are not a transformers model."""
    from pipelines.inference.base import GenerationOptions
    from pipelines.prompting import build_messages

    options = GenerationOptions(max_new_tokens=max_new_tokens, temperature=0.0, top_p=1.0,
                                top_k=1, seed=0)
    out: list[Reply] = []
    for question in questions:
        text, last = "", None
        for delta in backend.stream(build_messages(system, [], question), options):
            text += delta.text
            if delta.done:
                last = delta
        if last is None or last.stop_reason not in ("eos", "length"):
            reason = last.error if last is not None else "the stream ended without a stop"
            raise RuntimeError(f"{backend.name}: no reply to {question!r}: {reason}")
        out.append(Reply(question, text, last.stop_reason, last.completion_tokens or 0))
    return out
