"""Replies to a list of questions, for measuring: batched over a transformers model that is
already loaded (`generate`), or one at a time through any ChatBackend (`replies_from_backend`).

Both build the prompt the chat engine builds (`build_messages`, then `render_prompt`, which
folds the system text into the first user turn where the template has no system role) and
both return `Reply` rows with the stop reason, so the same figures apply to either.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from pipelines.inference.end_of_generation import end_of_generation_ids
from pipelines.prompting import build_messages, render_prompt


@dataclass
class Reply:
    question: str
    text: str           # as decoded (special tokens skipped), not stripped
    stop: str           # eos | length
    tokens: int         # generated tokens, the stopping token not counted


def prompt_ids(tokenizer: Any, template: str, system: str | None, question: str) -> list[int]:
    """The token ids of one question as the hf backend sends it: rendered with the
    tokenizer's BOS/EOS text and tokenised with add_special_tokens=False (BOS comes from
    the template, once)."""
    text = render_prompt(template, build_messages(system, [], question),
                         bos_token=tokenizer.bos_token or "", eos_token=tokenizer.eos_token or "")
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def generate(model: Any, tokenizer: Any, questions: Sequence[str], *, template: str,
             system: str | None = None, max_new_tokens: int, batch_size: int = 16,
             temperature: float = 0.0, end_ids: Iterable[int] | None = None) -> list[Reply]:
    """One reply per question from a loaded transformers model (a PeftModel too: call it
    inside `disable_adapter()` for the base's replies), in batches of `batch_size`.

    Greedy unless `temperature` > 0 (then sampled; seed torch first). Prompts are padded on
    the left whatever the tokenizer's `padding_side`, with its pad id (or the first end id
    when it has none). A reply ends at the first end-of-generation id (`end_ids`, by default
    `end_of_generation_ids(model, tokenizer)`): stop "eos", that token cut off; otherwise
    it ran to `max_new_tokens`: stop "length"."""
    import torch

    ends = list(end_ids) if end_ids is not None else list(end_of_generation_ids(model, tokenizer))
    if not ends:
        raise ValueError("no end-of-generation id: the model and tokenizer declare no EOS")
    end_set = set(ends)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else ends[0]
    sampling: dict[str, Any] = (
        {"do_sample": True, "temperature": temperature} if temperature > 0 else
        {"do_sample": False, "temperature": None, "top_p": None, "top_k": None})
    device = next(model.parameters()).device
    prompts = [prompt_ids(tokenizer, template, system, q) for q in questions]
    out: list[Reply] = []
    for start in range(0, len(prompts), max(1, batch_size)):
        chunk = prompts[start:start + max(1, batch_size)]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, prompt in enumerate(chunk):
            ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
            mask[row, width - len(prompt):] = 1
        with torch.no_grad():
            result = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                    max_new_tokens=max_new_tokens, eos_token_id=ends,
                                    pad_token_id=pad, **sampling)
        for row, new in enumerate(result[:, width:].tolist()):
            cut = next((i for i, t in enumerate(new) if t in end_set), None)
            kept = new if cut is None else new[:cut]
            out.append(Reply(questions[start + row],
                             tokenizer.decode(kept, skip_special_tokens=True),
                             "length" if cut is None else "eos", len(kept)))
        del result, ids, mask
    return out


def replies_from_backend(backend: Any, system: str | None, questions: Sequence[str],
                         max_new_tokens: int) -> list[Reply]:
    """Greedy replies through a ChatBackend (any variant: a GGUF with its LoRA adapter, a
    server), one question at a time, with the chat engine's prompt. The same measure as
    `generate`, for variants that are not a loaded transformers model. A reply that ends
    other than eos|length (cancel, error) raises RuntimeError naming the question."""
    from pipelines.inference.base import GenerationOptions

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
